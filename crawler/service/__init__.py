"""Integration with the service manager that runs the crawler (systemd)."""
