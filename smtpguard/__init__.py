"""smtpguard: a postscreen-like SMTP front end for Postfix."""

# Load the configuration tree first: config.py gathers the check sections
# declared in smtpguard/checks/, which themselves import config's parsers;
# loading config first (whatever module is imported) keeps that cycle in order.
from . import config as _config  # noqa: F401
