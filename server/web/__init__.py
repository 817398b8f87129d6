"""The server's pages for people in a browser: login, the overview, the device list, ...

Server-rendered (Jinja2 templates in `templates/`, files in `static/`), with a
session cookie opened from an API token (`auth`, `sessions`, `login`);
`app.install_pages` adds them to the server's app. Pages call the service
functions directly, never the HTTP API.
"""
