from . import info

info()
