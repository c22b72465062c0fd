"""Command-line scripts of the repository; tests import the ones that stay scripts as `from scripts import ...`."""
