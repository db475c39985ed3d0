"""Building blocks shared by several networks of the zoo (e.g. the Segment Anything image encoder and decoder)."""
