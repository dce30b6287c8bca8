"""The desktop window: a PySide6 view over the Qt-free core, on a qasync event loop.

Everything Qt lives in this package. ``app.gui.main.run_gui`` starts it;
``app.gui.application.GuiApp`` puts the window, tray, controller and
single-instance server together, and tests build it directly.
"""
