"""Providers: the contract (``base``), one module per provider family, the fallback chain
(``chain``) and the error taxonomy (``errors``)."""
