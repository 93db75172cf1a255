"""``python -m mailsync``: the same entry point as the ``mailsync`` command."""

from mailsync.entry import main

main()
