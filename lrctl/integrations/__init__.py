"""Adapters for code that expects a scheduler, a Hugging Face or a Lightning callback.

Each module imports its framework only when used: ``lrctl.integrations.hf``
needs transformers, ``lrctl.integrations.lightning`` needs lightning, and
``lrctl.integrations.scheduler`` needs torch.
"""
