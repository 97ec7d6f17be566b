"""Example transferlab plugins, registered through entry points (see pyproject.toml).

Nothing is imported here: transferlab imports each factory's module when its registry is first used,
so installing this package costs nothing until a plugin is needed.
"""
