"""Files xlegacy writes: the atomic output mechanism and the ELF, LiME and
Xen core-dump exporters."""
