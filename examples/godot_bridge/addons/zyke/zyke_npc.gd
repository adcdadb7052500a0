## An NPC driven by the local zyke-daemon. Set its persona, actions and emotions in the inspector,
## call [method say] and listen to [signal reply_received]. Signals arrive on the main thread.
@icon("res://addons/zyke/icon.svg")
class_name ZykeNPC
extends Node

## The final reply: [param reply] has say, emotion (one of [member emotions]) and action (one of
## [member actions]), plus target and args when the model set them.
signal reply_received(reply: Dictionary, request_id: String)
## A piece of the spoken line while it is generated (when [member stream] is on).
signal delta_received(text: String, request_id: String)
## A request for this NPC failed (code: a ZykeProtocol.ERROR_* code or ZykeClient.CONNECTION_LOST).
signal error(code: String, message: String, request_id: String)

## Unique per game; defaults to the node's name.
@export var npc_id := ""
@export var display_name := ""
@export_multiline var persona := ""
@export var actions := PackedStringArray(["none"])
@export var emotions := PackedStringArray(["neutral"])
## Optional descriptions by action name, e.g. {"ferry_across": "take the player over the river"}.
## The model reads them, so game-specific labels get used when they fit.
@export var action_descriptions: Dictionary = {}
## Optional descriptions by emotion name.
@export var emotion_descriptions: Dictionary = {}
@export var default_action := ""
@export var default_emotion := ""
@export_range(0, 200) var max_history := 12
@export_group("Generation")
@export_range(1, 1024) var max_tokens := 64
@export_range(0.0, 2.0, 0.05) var temperature := 0.7
@export var stream := true

## The client this NPC talks through; the Zyke autoload unless set before _ready.
var client: ZykeClient


func _ready() -> void:
	if npc_id == "":
		npc_id = String(name).to_snake_case().replace(" ", "_")
	if client == null:
		client = get_node_or_null("/root/Zyke") as ZykeClient
	if client == null:
		push_error("ZykeNPC: no Zyke autoload; enable the Zyke plugin in Project Settings > Plugins")
		return
	client.reply_received.connect(_on_reply)
	client.delta_received.connect(_on_delta)
	client.error.connect(_on_error)
	define()


## (Re)send this NPC's definition, e.g. after changing its persona at runtime.
func define() -> String:
	return client.define_npc(spec())


## The protocol's NpcSpec for this node.
func spec() -> Dictionary:
	var out := {
		"id": npc_id,
		"persona": persona,
		"actions": _choices(actions, action_descriptions),
		"emotions": _choices(emotions, emotion_descriptions),
		"max_history": max_history,
	}
	if display_name != "":
		out["name"] = display_name
	var defaults := {}
	if default_action != "":
		defaults["action"] = default_action
	if default_emotion != "":
		defaults["emotion"] = default_emotion
	if not defaults.is_empty():
		out["defaults"] = defaults
	return out


## Say [param text] to this NPC with optional game [param state] (location, gold...).
## [param allowed_actions] narrows this line to some of [member actions], e.g. only none and
## refuse while the shop is closed; an undeclared name fails with
## error(ZykeProtocol.ERROR_UNKNOWN_ACTION, ...).
## Returns the request id carried by reply_received, delta_received and error.
func say(text: String, state := {}, allowed_actions := PackedStringArray()) -> String:
	var options := {"max_tokens": max_tokens, "temperature": temperature}
	return client.say(npc_id, text, state, options, stream, allowed_actions)


## Stop the reply [param request_id] is generating.
func cancel(request_id: String) -> String:
	return client.cancel(request_id)


## Forget the conversation so far.
func reset() -> String:
	return client.reset_npc(npc_id)


## For the game's save file: await it, [code]var saved = await npc.save_state()[/code].
## Returns the NpcState dictionary (definition and history), or {} when it failed.
func save_state() -> Dictionary:
	var frame := await client.wait_for(client.get_state(npc_id))
	if frame.get("type") != ZykeProtocol.FRAME_NPC_STATE:
		return {}
	return frame.get("state", {})


## Restore what [method save_state] returned; the inspector fields take the saved definition.
## Await it for the outcome: true when the daemon accepted the state.
func load_state(state: Dictionary) -> bool:
	var npc: Dictionary = state.get("npc", {})
	if npc.get("id", npc_id) != npc_id:
		push_warning("ZykeNPC: state of '%s' loaded into '%s'" % [npc.get("id"), npc_id])
		state = state.duplicate(true)
		state["npc"]["id"] = npc_id
	_apply_spec(state.get("npc", {}))
	var frame := await client.wait_for(client.set_state(state))
	return frame.get("type") == ZykeProtocol.FRAME_NPC_STATE


func _apply_spec(npc: Dictionary) -> void:
	persona = str(npc.get("persona", persona))
	display_name = str(npc.get("name", display_name))
	action_descriptions = {}
	emotion_descriptions = {}
	actions = _names(npc.get("actions", Array(actions)), action_descriptions)
	emotions = _names(npc.get("emotions", Array(emotions)), emotion_descriptions)
	max_history = int(npc.get("max_history", max_history))
	var defaults: Dictionary = npc.get("defaults", {})
	default_action = str(defaults.get("action", ""))
	default_emotion = str(defaults.get("emotion", ""))


## The wire list: a bare name, or {"name", "description"} when the name has a description.
static func _choices(names: PackedStringArray, descriptions: Dictionary) -> Array:
	var out := []
	for label in names:
		var description := str(descriptions.get(label, ""))
		if description == "":
			out.append(label)
		else:
			out.append({"name": label, "description": description})
	return out


## Names of a wire list, filling [param descriptions] with the described ones.
static func _names(items: Array, descriptions: Dictionary) -> PackedStringArray:
	var out := PackedStringArray()
	for item in items:
		if item is Dictionary:
			out.append(str(item.get("name", "")))
			if item.has("description"):
				descriptions[str(item["name"])] = str(item["description"])
		else:
			out.append(str(item))
	return out


func _on_reply(from_npc: String, reply: Dictionary, request_id: String) -> void:
	if from_npc == npc_id:
		reply_received.emit(reply, request_id)


func _on_delta(from_npc: String, text: String, request_id: String) -> void:
	if from_npc == npc_id:
		delta_received.emit(text, request_id)


func _on_error(code: String, message: String, request_id: String) -> void:
	if client.npc_of(request_id) == npc_id:
		error.emit(code, message, request_id)
