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
## A request for this NPC failed (code: a ZykeProtocol.ERROR_* code or a ZykeClient client-side
## code such as CONNECTION_LOST), or, with an empty [param request_id], the connection did: the
## daemon cannot be reached (ZykeClient.CONNECTION_FAILED), refused the token (unauthorized) or
## the protocol (unsupported_version). Show it: otherwise the game just waits.
signal error(code: String, message: String, request_id: String)

## The persona used while [member persona] is empty (%s: the NPC's name).
const DEFAULT_PERSONA := "%s, a character in this game. Speaks briefly and stays in character."
const MAX_ID_LENGTH := 64
const MAX_NAME_LENGTH := 64
const MAX_PERSONA_LENGTH := 4000
const MAX_DESCRIPTION_LENGTH := 200

## Unique per game; defaults to the node's name made into a valid id ("Brom (1)" -> "brom_1").
## Letters, digits, _ . - and at most 64 characters; an invalid one is fixed with an error logged.
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
@export_group("Safety")
## Who this NPC speaks to (empty: the daemon's audience). It can only narrow the daemon's setting:
## the stricter of the two applies (docs/SAFETY.md). One of ZykeProtocol.AUDIENCES.
@export_enum("", "minor", "teen", "adult") var audience := ""
## The action a reply takes when the daemon deflects the player's line (empty: refuse when declared,
## else none). Must be one of [member actions].
@export var refusal_action := ""
## Extra words or phrases this NPC never says, on top of its audience's lists.
@export var blocked_words := PackedStringArray()
@export_group("Experience")
## Opt this NPC in to experience recording: its replies and the feedback on them are kept on the
## player's machine when the daemon records too (zyke-daemon start --record-experience).
@export var record_experience := false
@export_group("")
@export_group("Generation")
@export_range(1, 1024) var max_tokens := 64
@export_range(0.0, 2.0, 0.05) var temperature := 0.7
@export var stream := true
## How soon the daemon serves this NPC's lines: foreground for the one the player talks to,
## background for chatter (shorter replies, may be dropped at their deadline).
@export_enum("normal", "foreground", "background") var priority := "normal"

## The client this NPC talks through; the Zyke autoload unless set before _ready.
var client: ZykeClient


func _ready() -> void:
	if npc_id == "":
		npc_id = valid_id(String(name).to_snake_case())
	elif not _is_valid_id(npc_id):
		var fixed := valid_id(npc_id)
		push_error("ZykeNPC %s: npc_id '%s' is not a valid id (letters, digits, _ . - only, " % [
			get_path(), npc_id] + "at most %d); using '%s'" % [MAX_ID_LENGTH, fixed])
		npc_id = fixed
	if client == null:
		client = get_node_or_null("/root/Zyke") as ZykeClient
	if client == null:
		push_error("ZykeNPC: no Zyke autoload; enable the Zyke plugin in Project Settings > Plugins")
		return
	client.reply_received.connect(_on_reply)
	client.delta_received.connect(_on_delta)
	client.error.connect(_on_error)
	define()


## (Re)send this NPC's definition, e.g. after changing its persona at runtime. Inspector values the
## daemon would refuse are fixed first (see [method problems]), each with an error in the log.
func define() -> String:
	var found: Array[Dictionary] = []
	var out := _build_spec(found)
	for problem in found:
		var where := str(get_path()) if is_inside_tree() else npc_id
		var text := "ZykeNPC %s: %s" % [where, problem["message"]]
		if problem["error"]:
			push_error(text)
		else:
			push_warning(text)
	return client.define_npc(out)


## The protocol's NpcSpec for this node, always one the daemon accepts.
func spec() -> Dictionary:
	var ignored: Array[Dictionary] = []
	return _build_spec(ignored)


## What in the inspector values the daemon would refuse, and how [method spec] fixes it.
func problems() -> PackedStringArray:
	var found: Array[Dictionary] = []
	_build_spec(found)
	var out := PackedStringArray()
	for problem in found:
		out.append(problem["message"])
	return out


## [param raw] made into a valid NPC id: lower case, runs of other characters as "_", at most 64
## characters; "npc" when nothing is left. "Brom (1)" -> "brom_1".
static func valid_id(raw: String) -> String:
	var other := RegEx.create_from_string("[^a-z0-9_.-]+")
	var out := other.sub(raw.strip_edges().to_lower(), "_", true)
	while out.begins_with("_"):
		out = out.substr(1)
	out = out.substr(0, MAX_ID_LENGTH)
	while out.ends_with("_"):
		out = out.substr(0, out.length() - 1)
	if out.replace(".", "") == "":
		return "npc"
	return out


static func _is_valid_id(value: String) -> bool:
	return _matches(ZykeProtocol.NPC_ID_PATTERN, value) and value.replace(".", "") != ""


## Godot's RegEx (PCRE2) lets "$" match before a final newline; JSON Schema's does not.
static func _matches(pattern: String, value: String) -> bool:
	return not value.ends_with("\n") and RegEx.create_from_string(pattern).search(value) != null


func _build_spec(found: Array[Dictionary]) -> Dictionary:
	var action_names := _valid_labels(actions, "actions", "none", found)
	var emotion_names := _valid_labels(emotions, "emotions", "neutral", found)
	var text := persona.strip_edges()
	if text == "":
		text = DEFAULT_PERSONA % _shown_name()
		found.append({"error": false, "message": "persona is empty; using \"%s\"" % text})
	elif text.length() > MAX_PERSONA_LENGTH:
		text = text.substr(0, MAX_PERSONA_LENGTH)
		found.append({"error": true,
			"message": "persona is over %d characters; cut" % MAX_PERSONA_LENGTH})
	var out := {
		"id": npc_id if _is_valid_id(npc_id) else valid_id(npc_id),
		"persona": text,
		"actions": _choices(action_names, action_descriptions, found),
		"emotions": _choices(emotion_names, emotion_descriptions, found),
		"max_history": clampi(max_history, 0, 200),
	}
	var shown := display_name.strip_edges()
	if shown != "":
		out["name"] = shown.substr(0, MAX_NAME_LENGTH)
	var defaults := {}
	if default_action != "":
		if default_action in action_names:
			defaults["action"] = default_action
		else:
			found.append({"error": true, "message":
				"default_action '%s' is not one of actions %s; left out" % [default_action, action_names]})
	if default_emotion != "":
		if default_emotion in emotion_names:
			defaults["emotion"] = default_emotion
		else:
			found.append({"error": true, "message":
				"default_emotion '%s' is not one of emotions %s; left out" % [
					default_emotion, emotion_names]})
	if not defaults.is_empty():
		out["defaults"] = defaults
	if audience in ZykeProtocol.AUDIENCES:
		out["audience"] = audience
	elif audience != "":
		found.append({"error": true, "message":
			"audience '%s' is not one of %s; left out" % [audience, ZykeProtocol.AUDIENCES]})
	if refusal_action != "":
		if refusal_action in action_names:
			out["refusal_action"] = refusal_action
		else:
			found.append({"error": true, "message":
				"refusal_action '%s' is not one of actions %s; left out" % [refusal_action, action_names]})
	var words := PackedStringArray()
	for raw in blocked_words:
		var word := str(raw).strip_edges()
		if word != "" and word.length() <= 64 and not word in words and words.size() < 64:
			words.append(word)
	if not words.is_empty():
		out["blocked_words"] = Array(words)
	if record_experience:
		out["record"] = true
	return out


func _shown_name() -> String:
	if display_name.strip_edges() != "":
		return display_name.strip_edges()
	return String(name) if is_inside_tree() else npc_id


## The labels the daemon accepts, in order: valid, unique; [param fallback] when none is left.
static func _valid_labels(
	names: PackedStringArray, field: String, fallback: String, found: Array[Dictionary]
) -> PackedStringArray:
	var out := PackedStringArray()
	for raw in names:
		var label := str(raw).strip_edges()
		if not _matches(ZykeProtocol.LABEL_PATTERN, label):
			found.append({"error": true, "message":
				"%s: '%s' is not a valid label (letters, digits, _ . - only, at most 32); " % [
					field, raw] + "left out"})
		elif label in out:
			found.append({"error": true, "message": "%s: '%s' is listed twice; kept once" % [field, label]})
		else:
			out.append(label)
	if out.size() > 64:
		found.append({"error": true, "message": "%s: more than 64 labels; the rest are left out" % field})
		out = out.slice(0, 64)
	if out.is_empty():
		found.append({"error": true, "message": "%s is empty; using [\"%s\"]" % [field, fallback]})
		out.append(fallback)
	return out


## Say [param text] to this NPC with optional game [param state] (location, gold...).
## [param allowed_actions] narrows this line to some of [member actions], e.g. only none and
## refuse while the shop is closed; an undeclared name fails with
## error(ZykeProtocol.ERROR_UNKNOWN_ACTION, ...).
## [param line_priority] overrides [member priority] for this line; [param deadline_ms] (0: none)
## drops it with error(ZykeProtocol.ERROR_EXPIRED) if it has not started by then.
## Returns the request id carried by reply_received, delta_received and error.
func say(
	text: String,
	state := {},
	allowed_actions := PackedStringArray(),
	line_priority := "",
	deadline_ms := 0
) -> String:
	var options := {"max_tokens": max_tokens, "temperature": temperature}
	var p := line_priority if not line_priority.is_empty() else priority
	# normal is the daemon's default: not sending it keeps this working with daemons before priorities
	return client.say(
		npc_id, text, state, options, stream, allowed_actions, "" if p == "normal" else p, deadline_ms
	)


## Rate one of this NPC's replies after the fact: [param request_id] is what [method say]
## returned, [param reward] from -1 to 1, [param label] what would have been right, e.g.
## {"action": "refuse"}. Needs [member record_experience] and a daemon that records; errors arrive
## on [signal error] (ZykeProtocol.ERROR_NOT_RECORDING, ERROR_UNKNOWN_REPLY, ERROR_BAD_LABEL).
func feedback(request_id: String, reward: float, label := {}, source := "") -> String:
	return client.feedback(npc_id, request_id, reward, label, source)


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
	audience = str(npc.get("audience", ""))
	refusal_action = str(npc.get("refusal_action", ""))
	blocked_words = PackedStringArray(npc.get("blocked_words", []))
	var defaults: Dictionary = npc.get("defaults", {})
	default_action = str(defaults.get("action", ""))
	default_emotion = str(defaults.get("emotion", ""))


## The wire list: a bare name, or {"name", "description"} when the name has a description.
static func _choices(
	names: PackedStringArray, descriptions: Dictionary, found: Array[Dictionary]
) -> Array:
	var out := []
	for label in names:
		var description := str(descriptions.get(label, "")).strip_edges()
		if description == "":
			out.append(label)
			continue
		if description.length() > MAX_DESCRIPTION_LENGTH:
			found.append({"error": true, "message": "the description of '%s' is over %d characters; cut" % [
				label, MAX_DESCRIPTION_LENGTH]})
			description = description.substr(0, MAX_DESCRIPTION_LENGTH)
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
	# An empty request id is the connection's own problem (daemon down, wrong token...): every NPC
	# hears it, so a game that shows this NPC's errors never sits at "connecting..." unexplained.
	if request_id == "" or client.npc_of(request_id) == npc_id:
		error.emit(code, message, request_id)
