"""A check target whose import fails (``refdiff check raising_target:ddim`` must exit 2 with one line)."""

raise RuntimeError("this module cannot be imported")
