"""Walk a JSON report (benchmark results, metrics) and yield every number in it."""


def numbers(obj):
    """Every int and float (not bool) in nested dicts and lists, depth first."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj
