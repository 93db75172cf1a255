"""Several host workers sharing one PostgreSQL database (``serve --workers``).

- :mod:`.registry`: who the workers are, alive while they hold their lock;
- :mod:`.claims`: each cycle's share of the links, claimed with advisory
  locks, and the intake (the mailbox and the node's chores) for one of them;
- :mod:`.mailbag`: mail read by one worker for a link another holds;
- :mod:`.pool`: ``serve --workers N``, the processes of one machine.
"""
