"""HQ sync client: pulls identity changes, uploads audit events, and looks up unknown keys.

This package never imports ``daemon`` or ``drivers``; the daemon passes it a store object
that implements ``sync.store.SyncStore`` and the settings in ``sync.settings.SyncSettings``.
"""
