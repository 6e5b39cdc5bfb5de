"""Helpers shared by the tests (builders, process and file-system tools, the worker fault
hook). Import the module you need (``from tests.support.builders import tiny_image``): this
file stays empty so that a Ray worker importing the fault hook loads nothing else."""
