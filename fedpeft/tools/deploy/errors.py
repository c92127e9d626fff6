"""The one error of ``fedpeft deploy``: a deployment mistake, said in one line."""


class DeployError(ValueError):
    """A deployment mistake; the message is one line meant for the user."""
