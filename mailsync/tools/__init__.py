"""What a person runs by hand, beside the sync path: the demo
(:mod:`.demo`), the sample invoicing data (:mod:`.samples`), reading one
message (:mod:`.inspection`, ``mailsync inspect``) and checking a mailbox
(:mod:`.mailcheck`, ``mailsync mailbox test``). Nothing in the cycle imports
these."""
