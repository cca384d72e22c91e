"""machined-py: a command-line client for org.freedesktop.machine1 and
org.freedesktop.import1 with live progress bars.

It covers the image, transfer and machine verbs of machinectl and importctl
(systemd 262), with their output, and talks D-Bus only: the system bus
through sdbus (honouring ``$DBUS_SYSTEM_BUS_ADDRESS``).  Of the services'
packages it imports only ``imagepool.fmt`` (systemd's byte format, which
importd's log lines use too), so it works against systemd's daemons as well
as against ours.

Why rich for the terminal
-------------------------
The live display is built on `rich <https://github.com/Textualize/rich>`_:

* it is maintained, typed (``py.typed``, so ``mypy --strict`` checks our use of
  it) and pure Python, with no compiled parts to build on the target machine;
* ``rich.progress.Progress`` handles several tasks at once, one line each, with
  custom columns: that is exactly "one bar per transfer" for ``watch``;
* ``rich.live.Live`` redraws in place and measures the terminal on every
  render, so a window resize (we refresh on SIGWINCH) redraws at the new width;
  lines printed through its console (the transfer's log) go above the bars
  without tearing them;
* its ``Console`` knows whether it writes to a terminal (``is_terminal``,
  ``TERM=dumb``), which is where we switch between the live bars and plain log
  lines.

Two things rich does not do, we add: on SIGWINCH a terminal that rewraps its
lines when it gets narrower (tmux, VTE, kitty…; told by its environment, or
``$MACHINED_PY_REFLOW``) has turned each old bar into several rows, which are
erased before the redraw; and while the bars are shown the terminal does not
echo typed keys (nor "^C"), which would otherwise land inside them.

Several transfers
-----------------
A transfer verb follows the one transfer it started: Ctrl-C cancels it,
``--detach`` leaves it running and prints its id.  ``watch [ID…]`` (also
``list-transfers --follow``) shows one bar per running transfer, and adds a
bar for each transfer that starts while it watches; Ctrl-C there only stops
watching.  So several downloads are ``pull-raw --detach`` a few times, then
``watch``.

The alternatives were weaker for this job: tqdm draws one bar per object and
needs manual positioning for several, with no notion of log lines above them;
urwid/textual take over the whole screen; prompt_toolkit's progress bars want
to own the event loop and the terminal input; a hand-written ANSI renderer
would have to re-learn resize and width handling that rich already has.
"""

__version__ = "0.1.0"
