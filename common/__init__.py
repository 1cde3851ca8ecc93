"""The floor below every room: what data/, models/, engine/ and scripts/ all share."""
from . import resolvers  # noqa: F401  (registers ${by_task:...})
