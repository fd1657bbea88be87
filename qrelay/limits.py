"""Limits of the wire contract that the client SDK and the broker both enforce.

One place, so a client never refuses what the broker accepts (or the reverse).
"""

#: Tags per job (JobSpec.tags).
MAX_TAGS = 32
#: Jobs per ListJobs page; larger page sizes are cut to this.
MAX_PAGE_SIZE = 1000
#: Characters of a tag key (at least 1) and of a tag value.
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256


def tag_problem(tags: dict[str, str]) -> str | None:
    """What is wrong with a job's tags (JobSpec.tags, UpdateTags), or None.

    Keys of 1 to MAX_TAG_KEY characters, values of at most MAX_TAG_VALUE, at
    most MAX_TAGS of them, only printable characters (no NUL: PostgreSQL text
    cannot hold it; no newlines or other control characters: a tag is for
    people to read, in one table cell)."""
    if len(tags) > MAX_TAGS:
        return f"has {len(tags)} entries; at most {MAX_TAGS} allowed"
    for key, value in tags.items():
        shown = repr(key[:40] + "…" if len(key) > 40 else key)
        if not key:
            return "has an empty key; a tag key needs at least one character"
        if len(key) > MAX_TAG_KEY:
            return f"key {shown} is {len(key)} characters; at most {MAX_TAG_KEY} allowed"
        if len(value) > MAX_TAG_VALUE:
            return f"value of {shown} is {len(value)} characters; at most {MAX_TAG_VALUE} allowed"
        for where, text in (("key", key), (f"value of {shown}", value)):
            bad = next((c for c in text if not c.isprintable()), None)
            if bad is not None:
                what = "key " + shown if where == "key" else where
                return (
                    f"{what} contains the non-printable character {bad!r}; tags are printable text"
                )
    return None


#: Bounds of JobSpec.priority (order among a tenant's own queued jobs).
MIN_PRIORITY, MAX_PRIORITY = -10, 10
