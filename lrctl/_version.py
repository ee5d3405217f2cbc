"""The package version, in a module of its own: the hook and the controller both read it
without importing each other (a hook refuses a controller of another version)."""

__version__ = "0.2.0"
