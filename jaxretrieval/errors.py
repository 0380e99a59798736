"""The one exception type for mistakes a user can make and fix."""


class JaxRetrievalError(Exception):
    """Bad input, a bad config value, a missing or mismatched file.

    The message always says what is wrong and what to do about it.
    """


class WriterBusyError(JaxRetrievalError):
    """An index directory is already open for writing, by this or another process.

    Its message speaks to a Python caller (close the other Index); `command_line_message`
    says the same to someone at a shell, where the other writer is usually a running
    `jaxretrieval serve` or `jaxretrieval train`.
    """

    def __init__(self, message: str, directory: str):
        super().__init__(message)
        self.directory = directory

    def command_line_message(self) -> str:
        return (f"another process has the index at {self.directory} open for writing (a "
                "running `jaxretrieval serve`, or a training or index command on the same "
                "workdir); stop it, or wait for it to finish, then run this command again")
