## Finds the local zyke-daemon the way the Python SDK does: its token file and runtime file live in
## the per-user config and data dirs (platformdirs layout), and environment variables win.
class_name ZykeLocator
extends RefCounted

const APP := "zyke"
const DEFAULT_PORT := 7341


## ZYKE_TOKEN, else the daemon's token file; empty when neither exists.
static func read_token() -> String:
	var env := OS.get_environment("ZYKE_TOKEN")
	if env != "":
		return env
	var path := config_dir().path_join("token")
	if not FileAccess.file_exists(path):
		return ""
	return FileAccess.get_file_as_string(path).strip_edges()


## ZYKE_URL, else host and port from the daemon's runtime file, else the default port.
static func default_url() -> String:
	var env := OS.get_environment("ZYKE_URL")
	if env != "":
		return env
	var path := data_dir().path_join("daemon.json")
	if FileAccess.file_exists(path):
		var info = JSON.parse_string(FileAccess.get_file_as_string(path))
		if typeof(info) == TYPE_DICTIONARY and info.has("host") and info.has("port"):
			return "ws://%s:%d" % [info["host"], int(info["port"])]
	return "ws://127.0.0.1:%d" % DEFAULT_PORT


## Where the daemon keeps its token: ZYKE_CONFIG_DIR or platformdirs' user_config_dir("zyke").
static func config_dir() -> String:
	var env := OS.get_environment("ZYKE_CONFIG_DIR")
	if env != "":
		return env
	return _user_dir("XDG_CONFIG_HOME", ".config")


## Where the daemon writes daemon.json: ZYKE_DATA_DIR or platformdirs' user_data_dir("zyke").
static func data_dir() -> String:
	var env := OS.get_environment("ZYKE_DATA_DIR")
	if env != "":
		return env
	return _user_dir("XDG_DATA_HOME", ".local/share")


static func _user_dir(xdg_var: String, xdg_default: String) -> String:
	var home := OS.get_environment("HOME")
	match OS.get_name():
		"Windows":
			# platformdirs: %LOCALAPPDATA%\<appauthor>\<appname>, appauthor defaulting to appname.
			return OS.get_environment("LOCALAPPDATA").path_join(APP).path_join(APP)
		"macOS":
			return home.path_join("Library/Application Support").path_join(APP)
	var base := OS.get_environment(xdg_var)
	if base == "":
		base = home.path_join(xdg_default)
	return base.path_join(APP)
