"""What travels: the changeset body (:mod:`.changeset`), the sealed envelope
(:mod:`.envelope`), the e-mail around it (:mod:`.message`) and the control
records (:mod:`.controls`). Pure codecs: no database, no mailbox, no I/O
beyond the streams they are handed."""
