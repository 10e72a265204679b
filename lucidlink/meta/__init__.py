"""
The metadata server of one filespace.

:mod:`.store` keeps the tree, chunk maps and users in SQLite and changes
them only through the replayable records of :mod:`.mutations`
(:mod:`.interface` names the seam); :mod:`.locks` holds advisory locks;
:mod:`.sessions` keeps sessions, their handles and the login rate limits;
:mod:`.bootstrap` the one-time token of a new filespace; :mod:`.service`
answers the wire protocol with them; :mod:`.server` starts and stops it all;
:mod:`.tap` assembles ``twistd lucid-meta`` from :mod:`.config`.
"""
