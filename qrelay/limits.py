"""Limits of the wire contract that the client SDK and the broker both enforce.

One place, so a client never refuses what the broker accepts (or the reverse).
"""

#: Tags per job (JobSpec.tags).
MAX_TAGS = 32
#: Jobs per ListJobs page; larger page sizes are cut to this.
MAX_PAGE_SIZE = 1000
#: Bounds of JobSpec.priority (order among a tenant's own queued jobs).
MIN_PRIORITY, MAX_PRIORITY = -10, 10
