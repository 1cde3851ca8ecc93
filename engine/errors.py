"""Kept for old imports: the error type lives one floor down, in common/errors.py."""
from common.errors import UserError  # noqa: F401
