"""`python -m mmedit ...` (and `torchrun --nproc-per-node N -m mmedit ...`): the command line."""
from mmedit.cli.main import main

main()
