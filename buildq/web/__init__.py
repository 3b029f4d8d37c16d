"""The status page: ``buildq web`` (docs/web.md), an optional extra (``buildq[web]``)."""
