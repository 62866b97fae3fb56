"""One model's serving logic, free of HTTP and Ray: the live version, following an alias, predicting.

- :mod:`.service`: :class:`~serving.runtime.service.ModelService`, typed requests in, typed responses out.
"""
