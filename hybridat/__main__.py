"""`python -m hybridat` = the `hybridat` command (also what torchrun launches: `torchrun -m hybridat train ...`)."""

from .cli import main

main()
