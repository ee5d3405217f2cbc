"""What travels between the hook, the CLI and the controller."""
