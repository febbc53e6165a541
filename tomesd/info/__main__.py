"""`python -m tomesd.info`."""
from . import main

main()
