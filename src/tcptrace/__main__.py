"""`python -m tcptrace`: the same as the `tcptrace` console script."""

from tcptrace.cli import main

main()
