"""Where mailsync keeps its state: the ``mailsync_*`` tables (:mod:`.tables`),
the engine that opens the application database (:mod:`.engine`) and the
cached reflection of the application's tables (:mod:`.reflection`).

Nothing here knows about links, mail or the cycle."""
