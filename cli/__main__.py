"""``python -m cli`` is ``backbones`` (the container and the tests start it this way)."""

from cli.main import main

main()
