"""Alerts: a short mail to a person when something needs one.

- :mod:`.settings` — the ``[alerts]`` config table (who is told, the
  thresholds), read by :mod:`mailsync.config`, and its commented template;
- :mod:`.conditions` — what needs a person, read from the database in a
  fixed handful of statements (the same facts ``mailsync status`` shows);
- :mod:`.notify` — after a cycle: at most one check every
  ``every_minutes``, at most one mail per condition (per station and
  table where that matters) per day, remembered in ``mailsync_meta`` so
  that two processes or a restart do not tell twice; a mail that cannot
  go is logged and never fails the cycle. ``mailsync alerts test``.
"""
