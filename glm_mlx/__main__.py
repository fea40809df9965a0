"""`python -m glm_mlx`: the `glm-mlx` command."""

from glm_mlx.cli import main

main()
