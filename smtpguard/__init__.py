"""smtpguard: a postscreen-like SMTP front end for Postfix."""
