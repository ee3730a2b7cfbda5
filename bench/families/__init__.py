"""One module per op family: ``ops()`` lists its ops, ``cases(cfg)`` its shapes per tier
(registered by name in ``bench.core.FAMILIES``)."""
