## Demo: type into the box, Brom answers in the speech bubble over his head.
extends Node2D

var _current := ""

@onready var npc: ZykeNPC = $Brom/ZykeNPC
@onready var bubble: Label = $Brom/SpeechBubble
@onready var mood: Label = $Brom/Mood
@onready var input: LineEdit = $UI/Panel/Input
@onready var status_label: Label = $UI/Panel/Status


func _ready() -> void:
	Zyke.connected.connect(_on_connected)
	Zyke.disconnected.connect(_on_disconnected)
	npc.reply_received.connect(_on_reply)
	npc.delta_received.connect(_on_delta)
	npc.error.connect(_on_error)
	input.text_submitted.connect(_on_submitted)
	status_label.text = "connecting to zyke-daemon..."


func _on_submitted(text: String) -> void:
	if text.strip_edges() == "":
		return
	input.clear()
	bubble.text = "..."
	_current = npc.say(text, {"location": "forge", "time_of_day": "evening"})


func _on_delta(text: String, request_id: String) -> void:
	if request_id != _current:
		return
	bubble.text = text if bubble.text == "..." else bubble.text + text


func _on_reply(reply: Dictionary, request_id: String) -> void:
	if request_id != _current:
		return
	bubble.text = reply.get("say", "")
	mood.text = "[%s / %s]" % [reply.get("emotion", ""), reply.get("action", "")]


func _on_error(code: String, message: String, request_id: String) -> void:
	# An empty request id: the connection itself failed (daemon not running, wrong token...).
	if request_id == "":
		status_label.text = "%s: %s" % [code, message]
		return
	bubble.text = "(%s)" % code
	status_label.text = message


func _on_connected(welcome: Dictionary) -> void:
	status_label.text = "zyke-daemon %s, model %s" % [
		welcome.get("daemon_version", "?"), welcome.get("model", {}).get("name", "?")]


func _on_disconnected(_code: int, reason: String) -> void:
	status_label.text = "disconnected (%s); reconnecting..." % reason
