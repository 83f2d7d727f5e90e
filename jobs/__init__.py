"""Command-line entry points (run as scripts: python jobs/<name>.py); importable for tests."""
