"""Number ranges: the host leases blocks of a number series to stations.

Field staff create customers and invoices offline; their numbers must be
unique company-wide and stay in one tidy series (DESIGN §8). The host owns
each series (``mailsync_ranges``) and carves it upwards into blocks; every
block is a *lease* (``mailsync_leases``) held by one node — the host's own
included, so the host draws outside every station's lease. A node draws
numbers only from its own active leases, one transaction per number, so a
number is never issued twice, whatever crashes or resends happen.

The exchange (unsequenced control records, so they never wait behind a
large changeset; lost ones are sent again; their shape and checks are
:mod:`mailsync.wire.controls`):

* host → station :class:`~mailsync.wire.controls.RangeGrants` — a grant
  carries its range's definition and the host's view of ``next``; grants go
  again until the station confirms them; leases asked back.
* station → host :class:`~mailsync.wire.controls.RangeReport` — what it
  holds and uses, and the ranges whose current block's unused share fell
  under the threshold with no next block held.

A lease the station gave back (``range release``) has its unused tail
returned to the host's free list only once the station confirms it stopped
drawing from it. A station that went back to an older backup retires its
leases (their unused rest is never issued again) and gets fresh ones.

The package is split by job, and this file re-exports nothing (a package
``__init__`` that imports its parts is how the old db ↔ dialects ↔ ranges
import circle came about):

* :mod:`.model` — the dataclasses, constants and lookups; imports no dialect;
* :mod:`.admin` — what ``mailsync range …`` and ``status`` do on a node;
* :mod:`.draw` — issuing numbers and leasing blocks;
* :mod:`.exchange` — the control traffic above, and retiring leases.
"""
