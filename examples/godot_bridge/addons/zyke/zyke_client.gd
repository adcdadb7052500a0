## Zyke client, registered by the plugin as the autoload [code]Zyke[/code].
##
## Talks to the local zyke-daemon over a [WebSocketPeer]: connects, authenticates with the
## daemon's token (hello), keeps the NPCs it was given defined across reconnects, and polls the
## socket in [method _process], so every signal is emitted on the main thread.
class_name ZykeClient
extends Node

## Authenticated: [param welcome] is the daemon's welcome frame (protocol, daemon_version, model).
signal connected(welcome: Dictionary)
## The connection closed; the client reconnects with backoff unless [member auto_reconnect] is off.
signal disconnected(code: int, reason: String)
## The final reply to an npc.say: [param reply] has say, emotion and action.
signal reply_received(npc_id: String, reply: Dictionary, request_id: String)
## A piece of the spoken line while it is generated (say with stream on).
signal delta_received(npc_id: String, text: String, request_id: String)
## A request failed; [param code] is a ZykeProtocol.ERROR_* code or CONNECTION_LOST.
signal error(code: String, message: String, request_id: String)
## Every answer that ends a request (including error frames), for code that awaits one by id.
signal response_received(frame: Dictionary)

enum Status { DISCONNECTED, CONNECTING, AUTHENTICATING, READY, STOPPED }

## Client-side error code: the connection closed before the request was answered.
const CONNECTION_LOST := "connection_lost"
## Client-side error code: the daemon speaks another protocol version.
const VERSION_MISMATCH := "version_mismatch"
const DEFAULT_PORT := 7341
const CLIENT_NAME := "zyke-godot"
const CLIENT_VERSION := "0.1.0"

## Daemon address; empty means ZYKE_URL, then the daemon's runtime file, then the default port.
var url := ""
## Daemon token; empty means ZYKE_TOKEN, then the daemon's token file.
var token := ""
## Namespace for NPC ids and saved sessions on the daemon (empty: "default").
var game := ""
## Connect on the first frame queued (and on _ready when an NPC is defined).
var auto_connect := true
var auto_reconnect := true
var reconnect_min_delay := 0.5
var reconnect_max_delay := 15.0
var connect_timeout := 5.0

var status: Status = Status.DISCONNECTED
## The last welcome frame (empty until authenticated).
var welcome: Dictionary = {}

var _ws := WebSocketPeer.new()
var _npcs: Dictionary = {}
var _pending: Dictionary = {}
var _request_npc: Dictionary = {}
var _outbox: Array[Dictionary] = []
var _next_id := 0
var _backoff := 0.0
var _retry_at := 0.0
var _deadline := 0.0
var _hello_id := ""


func _process(_delta: float) -> void:
	poll()


## Start connecting now (normally not needed: queuing a frame connects).
func connect_to_daemon() -> void:
	if status == Status.STOPPED:
		status = Status.DISCONNECTED
	if status == Status.DISCONNECTED:
		_open()


## Close the connection and stop reconnecting; queued and pending requests fail.
func close() -> void:
	if status != Status.DISCONNECTED and status != Status.STOPPED:
		_ws.close(1000, "client closed")
	_fail_all(CONNECTION_LOST, "client closed")
	status = Status.STOPPED


func is_authenticated() -> bool:
	return status == Status.READY


## Define (or update) an NPC; it is re-defined on every reconnect. Returns the request id.
## [param spec] follows the protocol's NpcSpec: id, persona, actions, emotions, name, defaults...
## An action or emotion is a name or {"name": ..., "description": ...}; the model reads
## descriptions, so game-specific labels get used when they fit.
func define_npc(spec: Dictionary) -> String:
	var npc_id := str(spec.get("id", ""))
	_npcs[npc_id] = spec.duplicate(true)
	var request_id := new_request_id()
	if status == Status.READY:
		_request_npc[request_id] = npc_id
		_send(_frame(ZykeProtocol.FRAME_NPC_DEFINE, request_id, {"npc": spec}), npc_id)
	else:
		_ensure_connecting()
	return request_id


## Forget an NPC locally (it is no longer re-defined on reconnect; the daemon keeps its history).
func forget_npc(npc_id: String) -> void:
	_npcs.erase(npc_id)


## Say [param text] to an NPC. Returns the request id that reply_received / error carry back.
## [param allowed_actions] narrows this line to some of the NPC's declared actions (empty: all of
## them); a name the NPC did not declare fails with error(ZykeProtocol.ERROR_UNKNOWN_ACTION).
func say(
	npc_id: String,
	text: String,
	state: Dictionary = {},
	options: Dictionary = {},
	stream := true,
	allowed_actions := PackedStringArray()
) -> String:
	var body := {"npc": npc_id, "input": text, "stream": stream}
	if not state.is_empty():
		body["state"] = state
	if not options.is_empty():
		body["options"] = options
	if not allowed_actions.is_empty():
		body["allowed_actions"] = Array(allowed_actions)
	return _request(ZykeProtocol.FRAME_NPC_SAY, body, npc_id)


## Stop a say in flight; it ends with error(cancelled).
func cancel(target_request_id: String) -> String:
	return _request(ZykeProtocol.FRAME_CANCEL, {"target": target_request_id}, "")


## Forget an NPC's conversation history on the daemon.
func reset_npc(npc_id: String) -> String:
	return _request(ZykeProtocol.FRAME_NPC_RESET, {"npc": npc_id}, npc_id)


## Ask for an NPC's state (answered by response_received with an npc.state frame).
func get_state(npc_id: String) -> String:
	return _request(ZykeProtocol.FRAME_NPC_STATE_GET, {"npc": npc_id}, npc_id)


## Restore an NPC's state from a save; it also becomes an NPC this client re-defines.
func set_state(state: Dictionary) -> String:
	var npc: Dictionary = state.get("npc", {})
	var npc_id := str(npc.get("id", ""))
	if npc_id != "":
		_npcs[npc_id] = npc.duplicate(true)
	return _request(ZykeProtocol.FRAME_NPC_STATE_SET, {"state": state}, npc_id)


func list_adapters() -> String:
	return _request(ZykeProtocol.FRAME_ADAPTER_LIST, {}, "")


func ping() -> String:
	return _request(ZykeProtocol.FRAME_PING, {}, "")


## Await the frame that answers [param request_id] (an error frame when it failed).
func wait_for(request_id: String) -> Dictionary:
	while true:
		var frame: Dictionary = await response_received
		if str(frame.get("id", "")) == request_id:
			return frame
	return {}


## The NPC a request in flight is about ("" for none or unknown).
func npc_of(request_id: String) -> String:
	return str(_request_npc.get(request_id, ""))


func new_request_id() -> String:
	_next_id += 1
	return "g%d" % _next_id


## Drive the connection: called every frame from _process, callable by hand in tests.
func poll() -> void:
	var now := Time.get_ticks_msec() / 1000.0
	if status == Status.DISCONNECTED:
		if _retry_at > 0.0 and now >= _retry_at:
			_open()
		return
	if status == Status.STOPPED:
		return
	_ws.poll()
	var ready_state := _ws.get_ready_state()
	if ready_state == WebSocketPeer.STATE_OPEN:
		if status == Status.CONNECTING:
			_send_hello()
		while _ws.get_available_packet_count() > 0 and status != Status.STOPPED:
			_handle_packet(_ws.get_packet().get_string_from_utf8())
		if status == Status.AUTHENTICATING and now > _deadline:
			_ws.close(4000, "no welcome")
	elif ready_state == WebSocketPeer.STATE_CONNECTING:
		if now > _deadline:
			_ws.close()
			_on_closed(-1, "connect timed out")
	elif ready_state == WebSocketPeer.STATE_CLOSED:
		_on_closed(_ws.get_close_code(), _ws.get_close_reason())


func _request(frame_type: String, body: Dictionary, npc_id: String) -> String:
	var request_id := new_request_id()
	var frame := _frame(frame_type, request_id, body)
	if npc_id != "":
		_request_npc[request_id] = npc_id
	if status == Status.READY:
		_send(frame, npc_id)
	else:
		_outbox.append({"frame": frame, "npc": npc_id})
		_ensure_connecting()
	return request_id


func _frame(frame_type: String, request_id: String, body: Dictionary) -> Dictionary:
	var frame := {"v": ZykeProtocol.PROTOCOL_VERSION, "type": frame_type, "id": request_id}
	frame.merge(body)
	return frame


func _send(frame: Dictionary, npc_id: String) -> void:
	_pending[frame["id"]] = {"type": frame["type"], "npc": npc_id}
	var err := _ws.send_text(JSON.stringify(_normalize(frame)))
	if err != OK:
		_pending.erase(frame["id"])
		_fail(frame["id"], npc_id, CONNECTION_LOST, "send failed (%s)" % error_string(err))


func _ensure_connecting() -> void:
	if auto_connect and status == Status.DISCONNECTED and _retry_at == 0.0:
		_open()


func _open() -> void:
	_retry_at = 0.0
	var target := url if url != "" else ZykeLocator.default_url()
	if token == "":
		token = ZykeLocator.read_token()
	_ws = WebSocketPeer.new()
	var err := _ws.connect_to_url(target)
	if err != OK:
		status = Status.CONNECTING
		_on_closed(-1, "cannot connect to %s (%s)" % [target, error_string(err)])
		return
	status = Status.CONNECTING
	_deadline = Time.get_ticks_msec() / 1000.0 + connect_timeout


func _send_hello() -> void:
	status = Status.AUTHENTICATING
	_hello_id = new_request_id()
	var frame := _frame(ZykeProtocol.FRAME_HELLO, _hello_id, {
		"token": token,
		"protocol": ZykeProtocol.PROTOCOL_VERSION,
		"client": {"name": CLIENT_NAME, "version": CLIENT_VERSION},
	})
	if game != "":
		frame["game"] = game
	_deadline = Time.get_ticks_msec() / 1000.0 + connect_timeout
	_ws.send_text(JSON.stringify(frame))


func _handle_packet(text: String) -> void:
	var frame = JSON.parse_string(text)
	if typeof(frame) != TYPE_DICTIONARY:
		push_warning("Zyke: ignoring a frame that is not a JSON object")
		return
	var frame_type := str(frame.get("type", ""))
	var request_id := "" if frame.get("id") == null else str(frame.get("id"))
	if request_id != "" and request_id == _hello_id:
		_on_hello_answer(frame)
		return
	if frame_type == ZykeProtocol.FRAME_REPLY_DELTA:
		delta_received.emit(str(frame.get("npc", "")), str(frame.get("text", "")), request_id)
		return
	if frame_type == ZykeProtocol.FRAME_REPLY:
		_pending.erase(request_id)
		reply_received.emit(str(frame.get("npc", "")), frame.get("reply", {}), request_id)
		response_received.emit(frame)
	elif frame_type == ZykeProtocol.FRAME_ERROR:
		var info: Dictionary = _pending.get(request_id, {})
		_pending.erase(request_id)
		_fail(request_id, str(info.get("npc", "")), str(frame.get("code", "")),
			str(frame.get("message", "")))
	else:
		_pending.erase(request_id)
		response_received.emit(frame)
	_request_npc.erase(request_id)


func _on_hello_answer(frame: Dictionary) -> void:
	_hello_id = ""
	if frame.get("type") == ZykeProtocol.FRAME_ERROR:
		var code := str(frame.get("code", ""))
		error.emit(code, str(frame.get("message", "")), "")
		# A wrong token or protocol will not fix itself: stop instead of retrying forever.
		if code == ZykeProtocol.ERROR_UNAUTHORIZED or code == ZykeProtocol.ERROR_UNSUPPORTED_VERSION:
			close()
		else:
			_ws.close(4000, "hello failed")
		return
	if int(frame.get("protocol", 0)) != ZykeProtocol.PROTOCOL_VERSION:
		error.emit(VERSION_MISMATCH, "daemon speaks protocol %s, this addon %d" % [
			frame.get("protocol"), ZykeProtocol.PROTOCOL_VERSION], "")
		close()
		return
	welcome = frame
	status = Status.READY
	_backoff = 0.0
	for npc_id in _npcs:
		_send(_frame(ZykeProtocol.FRAME_NPC_DEFINE, new_request_id(), {"npc": _npcs[npc_id]}), npc_id)
	var queued := _outbox
	_outbox = []
	for item in queued:
		_send(item["frame"], item["npc"])
	connected.emit(welcome)


func _on_closed(code: int, reason: String) -> void:
	var was_ready := status == Status.READY
	status = Status.DISCONNECTED
	_hello_id = ""
	welcome = {}
	var lost := _pending
	_pending = {}
	for request_id in lost:
		_fail(request_id, str(lost[request_id].get("npc", "")), CONNECTION_LOST,
			"connection closed before the answer (%s)" % reason)
	if was_ready:
		disconnected.emit(code, reason)
	if auto_reconnect:
		_backoff = clampf(_backoff * 2.0, reconnect_min_delay, reconnect_max_delay)
		_retry_at = Time.get_ticks_msec() / 1000.0 + _backoff * randf_range(0.8, 1.2)
	else:
		_fail_all(CONNECTION_LOST, reason)


func _fail_all(code: String, message: String) -> void:
	var lost := _pending
	_pending = {}
	for request_id in lost:
		_fail(request_id, str(lost[request_id].get("npc", "")), code, message)
	var queued := _outbox
	_outbox = []
	for item in queued:
		_fail(item["frame"]["id"], item["npc"], code, message)


func _fail(request_id: String, npc_id: String, code: String, message: String) -> void:
	if npc_id != "":
		_request_npc[request_id] = npc_id
	error.emit(code, message, request_id)
	response_received.emit({
		"v": ZykeProtocol.PROTOCOL_VERSION,
		"type": ZykeProtocol.FRAME_ERROR,
		"id": request_id,
		"code": code,
		"message": message,
	})
	_request_npc.erase(request_id)


## JSON numbers come back from JSON.parse_string as floats; send whole ones as integers.
static func _normalize(value: Variant) -> Variant:
	match typeof(value):
		TYPE_FLOAT:
			if is_finite(value) and value == floorf(value) and absf(value) < 9.0e15:
				return int(value)
			return value
		TYPE_DICTIONARY:
			var out := {}
			for key in value:
				out[key] = _normalize(value[key])
			return out
		TYPE_ARRAY:
			var out := []
			for item in value:
				out.append(_normalize(item))
			return out
		TYPE_PACKED_STRING_ARRAY:
			return Array(value)
	return value
