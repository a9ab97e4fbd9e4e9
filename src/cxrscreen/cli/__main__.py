"""`python -m cxrscreen.cli`."""

from cxrscreen.cli import main

main()
