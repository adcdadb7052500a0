## Editor plugin: registers the Zyke autoload while the addon is enabled.
@tool
extends EditorPlugin

const AUTOLOAD_NAME := "Zyke"
const AUTOLOAD_PATH := "res://addons/zyke/zyke_client.gd"


func _enable_plugin() -> void:
	add_autoload_singleton(AUTOLOAD_NAME, AUTOLOAD_PATH)


func _disable_plugin() -> void:
	remove_autoload_singleton(AUTOLOAD_NAME)
