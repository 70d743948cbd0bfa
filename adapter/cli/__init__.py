"""The ``adapter`` command line: click commands only, each a thin layer over the drivers."""
