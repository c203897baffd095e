"""Alert delivery: pure rendering, the sinks that send (console, Slack, SMTP), and the dispatcher loop.

Start one in-process (tests, ``censorwatch up``)::

    d = Dispatcher(settings)
    thread = d.start_thread()
    ...
    d.stop(); thread.join()
"""
