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
## A request failed; [param code] is a ZykeProtocol.ERROR_* code or one of the client-side codes
## below. [param request_id] is empty for a problem of the connection itself (the daemon cannot be
## reached, refused the token or the protocol, or sent an error frame that answers no request).
signal error(code: String, message: String, request_id: String)
## Connecting or authenticating failed ([param code]: CONNECTION_FAILED,
## ZykeProtocol.ERROR_UNAUTHORIZED, ZykeProtocol.ERROR_UNSUPPORTED_VERSION or VERSION_MISMATCH).
## Also emitted as error(code, message, "").
signal connection_failed(code: String, message: String)
## Every answer that ends a request (including error frames), for code that awaits one by id.
signal response_received(frame: Dictionary)

enum Status { DISCONNECTED, CONNECTING, AUTHENTICATING, READY, STOPPED }

## Client-side error code: the connection closed before the request was answered, or the client
## was closed ([method close]) before it was sent.
const CONNECTION_LOST := "connection_lost"
## Client-side error code: the daemon could not be reached (refused, timed out, closed before
## welcome).
const CONNECTION_FAILED := "connection_failed"
## Client-side error code: a request's values cannot be sent as JSON (an Object, NaN, a cycle...).
const INVALID_ARGUMENT := "invalid_argument"
## Client-side error code: the daemon speaks another protocol version.
const VERSION_MISMATCH := "version_mismatch"
const DEFAULT_PORT := 7341
const CLIENT_NAME := "zyke-godot"
const CLIENT_VERSION := "0.1.0"
## WebSocketPeer's buffers default to 64 KiB, and a message over them closes the socket. The daemon
## reads messages up to 4 MiB (answering frame_too_large above its own frame cap, see the welcome's
## limits.max_frame_bytes) and a saved NPC state it sends can exceed 64 KiB, so both are 4 MiB.
const BUFFER_BYTES := 4 * 1024 * 1024
## How many answers [method wait_for] still finds after they arrived (a request that failed at once,
## or one answered before the wait began).
const KEEP_ANSWERS := 64
## Deeper than this, a value is refused before sending (a cycle, or far past the daemon's cap).
const MAX_DEPTH := 128

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
## Seconds a request may wait for its answer, queued time included, before it fails with
## error(ZykeProtocol.ERROR_TIMEOUT) (a say in flight is then cancelled); 0 waits forever. Longer
## than the daemon's own request timeout (120 s by default), whose typed answer normally comes
## first.
var request_timeout := 150.0

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
var _reported := false
## request id -> when it was made (seconds), for every request not answered yet.
var _started: Dictionary = {}
## npc id -> ids of define_npc calls made before the connection was up, sent on welcome.
var _waiting_defines: Dictionary = {}
## request id -> its answer frame, the last KEEP_ANSWERS of them.
var _answers: Dictionary = {}
var _answer_order: Array[String] = []
## ids of requests that timed out here: the daemon's late answer to them is dropped.
var _expired: Dictionary = {}


func _init() -> void:
	# The autoload keeps talking to the daemon while the game is paused (a pause menu, a dialogue
	# that pauses the world): without this its _process stops and every request waits.
	process_mode = Node.PROCESS_MODE_ALWAYS


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
## Before the connection is up the definition waits and goes out on welcome under this request
## id, so [method wait_for] on it returns the daemon's answer.
func define_npc(spec: Dictionary) -> String:
	var npc_id := str(spec.get("id", ""))
	var request_id := new_request_id()
	_request_npc[request_id] = npc_id
	_started[request_id] = _now()
	var problem := json_problem(spec)
	if problem != "":
		_fail(request_id, npc_id, INVALID_ARGUMENT, "npc spec: " + problem)
		return request_id
	if status == Status.STOPPED:
		_fail(request_id, npc_id, CONNECTION_LOST, "client closed; call connect_to_daemon() first")
		return request_id
	_npcs[npc_id] = spec.duplicate(true)
	if status == Status.READY:
		_send(_frame(ZykeProtocol.FRAME_NPC_DEFINE, request_id, {"npc": spec}), npc_id)
	else:
		var ids: Array = _waiting_defines.get(npc_id, [])
		ids.append(request_id)
		_waiting_defines[npc_id] = ids
		_ensure_connecting()
	return request_id


## Forget an NPC locally (it is no longer re-defined on reconnect; the daemon keeps its history).
## A define_npc for it still waiting for the connection fails with error(cancelled).
func forget_npc(npc_id: String) -> void:
	_npcs.erase(npc_id)
	var ids: Array = _waiting_defines.get(npc_id, [])
	_waiting_defines.erase(npc_id)
	for request_id in ids:
		_fail(request_id, npc_id, ZykeProtocol.ERROR_CANCELLED,
			"forget_npc before the definition was sent")


## Say [param text] to an NPC. Returns the request id that reply_received / error carry back.
## [param allowed_actions] narrows this line to some of the NPC's declared actions (empty: all of
## them); a name the NPC did not declare fails with error(ZykeProtocol.ERROR_UNKNOWN_ACTION).
## [param priority] is a ZykeProtocol.PRIORITY_* value (empty: the NPC's default, else normal): the
## NPC the player talks to is foreground, ambient chatter background. [param deadline_ms] (0: none)
## drops a line that has not started by then with error(ZykeProtocol.ERROR_EXPIRED).
## [param safety_report] asks for the reply's "safety" field when a safety rail intervened (needs a
## daemon with the "safety" capability; docs/SAFETY.md); the rails apply either way.
func say(
	npc_id: String,
	text: String,
	state: Dictionary = {},
	options: Dictionary = {},
	stream := true,
	allowed_actions := PackedStringArray(),
	priority := "",
	deadline_ms := 0,
	safety_report := false
) -> String:
	var body := {"npc": npc_id, "input": text, "stream": stream}
	if not state.is_empty():
		body["state"] = state
	if not options.is_empty():
		body["options"] = options
	if not allowed_actions.is_empty():
		body["allowed_actions"] = Array(allowed_actions)
	if not priority.is_empty():
		body["priority"] = priority
	if deadline_ms > 0:
		body["deadline_ms"] = deadline_ms
	if safety_report:
		body["safety_report"] = true
	return _request(ZykeProtocol.FRAME_NPC_SAY, body, npc_id)


## Rate an earlier reply of an NPC, after the fact (docs/EXPERIENCE.md): [param reply_id] is
## the request id [method say] returned, [param reward] from -1 (it broke the scene) to 1 (the
## player laughed), [param label] what would have been right ({"action": "refuse"}; keys action,
## emotion, say; empty: none), [param source] "game", "player" or "simulated" (empty: game).
## Recorded with the reply when the daemon records experience and the NPC was defined with
## "record": true; answered by response_received with an ok frame, else
## error(ZykeProtocol.ERROR_NOT_RECORDING, ERROR_UNKNOWN_REPLY, ERROR_BAD_LABEL or
## ERROR_EXPERIENCE_FULL). Needs the daemon's "feedback" capability.
func feedback(
	npc_id: String,
	reply_id: String,
	reward: float,
	label: Dictionary = {},
	source := ""
) -> String:
	var body := {"npc": npc_id, "reply_id": reply_id, "reward": reward}
	if not label.is_empty():
		body["label"] = label
	if not source.is_empty():
		body["source"] = source
	return _request(ZykeProtocol.FRAME_FEEDBACK, body, npc_id)


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
	var npc = state.get("npc", {})
	var npc_id := ""
	if npc is Dictionary:
		npc_id = str(npc.get("id", ""))
		if npc_id != "" and status != Status.STOPPED and json_problem(state) == "":
			_npcs[npc_id] = npc.duplicate(true)
	return _request(ZykeProtocol.FRAME_NPC_STATE_SET, {"state": state}, npc_id)


func list_adapters() -> String:
	return _request(ZykeProtocol.FRAME_ADAPTER_LIST, {}, "")


func ping() -> String:
	return _request(ZykeProtocol.FRAME_PING, {}, "")


## Await the frame that answers [param request_id] (an error frame when it failed). Never hangs:
## an answer that came before the wait (e.g. a send that failed at once) is kept for it, an id that
## is neither queued nor in flight answers error(unknown_request) at once, and every request ends
## by its answer, a lost connection, [method close], or [member request_timeout].
func wait_for(request_id: String) -> Dictionary:
	if _answers.has(request_id):
		return _answers[request_id]
	if not is_open(request_id):
		return _error_frame(request_id, ZykeProtocol.ERROR_UNKNOWN_REQUEST,
			"no request %s is queued or in flight on this client" % request_id)
	while true:
		var frame: Dictionary = await response_received
		if str(frame.get("id", "")) == request_id:
			return frame
	return {}


## True while [param request_id] is queued, waiting for the connection, or sent and not answered.
func is_open(request_id: String) -> bool:
	return _started.has(request_id)


## The NPC a request in flight is about ("" for none or unknown).
func npc_of(request_id: String) -> String:
	return str(_request_npc.get(request_id, ""))


func new_request_id() -> String:
	_next_id += 1
	return "g%d" % _next_id


## Drive the connection: called every frame from _process, callable by hand in tests.
func poll() -> void:
	var now := _now()
	_expire_overdue(now)
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
			_report_connection(CONNECTION_FAILED, "no welcome within %s s" % connect_timeout)
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
	_started[request_id] = _now()
	var problem := json_problem(body)
	if problem != "":
		_fail(request_id, npc_id, INVALID_ARGUMENT, problem)
	elif status == Status.STOPPED:
		# close() stopped the client: nothing would ever send this, so it fails now.
		_fail(request_id, npc_id, CONNECTION_LOST, "client closed; call connect_to_daemon() first")
	elif status == Status.READY:
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
	var request_id: String = frame["id"]
	var text := JSON.stringify(_normalize(frame))
	var size := text.to_utf8_buffer().size()
	var limit := int(welcome.get("limits", {}).get("max_frame_bytes", BUFFER_BYTES))
	if size > limit:
		_fail(request_id, npc_id, ZykeProtocol.ERROR_FRAME_TOO_LARGE,
			"frame is %d bytes; the daemon's limit is %d" % [size, limit])
		return
	_pending[request_id] = {"type": frame["type"], "npc": npc_id}
	var err := _ws.send_text(text)
	if err != OK:
		_pending.erase(request_id)
		_fail(request_id, npc_id, CONNECTION_LOST, "send failed (%s)" % error_string(err))


func _ensure_connecting() -> void:
	if auto_connect and status == Status.DISCONNECTED and _retry_at == 0.0:
		_open()


func _open() -> void:
	_retry_at = 0.0
	var target := url if url != "" else ZykeLocator.default_url()
	if token == "":
		token = ZykeLocator.read_token()
	_reported = false
	_ws = WebSocketPeer.new()
	_ws.inbound_buffer_size = BUFFER_BYTES
	_ws.outbound_buffer_size = BUFFER_BYTES
	var err := _ws.connect_to_url(target)
	status = Status.CONNECTING
	if err != OK:
		_on_closed(-1, "cannot connect to %s (%s)" % [target, error_string(err)])
		return
	_deadline = _now() + connect_timeout


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
	_deadline = _now() + connect_timeout
	var err := _ws.send_text(JSON.stringify(frame))
	if err != OK:
		_report_connection(CONNECTION_FAILED, "cannot send hello (%s)" % error_string(err))
		_ws.close(4000, "hello not sent")


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
	if _expired.has(request_id):
		# It timed out here and was already answered with error(timeout): drop the late answer.
		if frame_type != ZykeProtocol.FRAME_REPLY_DELTA:
			_expired.erase(request_id)
		return
	if frame_type == ZykeProtocol.FRAME_REPLY_DELTA:
		delta_received.emit(str(frame.get("npc", "")), str(frame.get("text", "")), request_id)
		return
	if frame_type == ZykeProtocol.FRAME_ERROR:
		var info: Dictionary = _pending.get(request_id, {})
		_pending.erase(request_id)
		# An error frame without an id answers no request: it is about the connection.
		_fail(request_id, str(info.get("npc", "")), str(frame.get("code", "")),
			str(frame.get("message", "")))
		return
	_pending.erase(request_id)
	_started.erase(request_id)
	_keep_answer(request_id, frame)
	if frame_type == ZykeProtocol.FRAME_REPLY:
		reply_received.emit(str(frame.get("npc", "")), frame.get("reply", {}), request_id)
	response_received.emit(frame)
	_request_npc.erase(request_id)


func _on_hello_answer(frame: Dictionary) -> void:
	_hello_id = ""
	if frame.get("type") == ZykeProtocol.FRAME_ERROR:
		var code := str(frame.get("code", ""))
		var message := str(frame.get("message", ""))
		_report_connection(code, message)
		# A wrong token or protocol will not fix itself: stop instead of retrying forever.
		if code == ZykeProtocol.ERROR_UNAUTHORIZED or code == ZykeProtocol.ERROR_UNSUPPORTED_VERSION:
			_stop(code, message)
		else:
			_ws.close(4000, "hello failed")
		return
	if int(frame.get("protocol", 0)) != ZykeProtocol.PROTOCOL_VERSION:
		var why := "daemon speaks protocol %s, this addon %d" % [
			frame.get("protocol"), ZykeProtocol.PROTOCOL_VERSION]
		_report_connection(VERSION_MISMATCH, why)
		_stop(VERSION_MISMATCH, why)
		return
	welcome = frame
	status = Status.READY
	_backoff = 0.0
	# Definitions first (those made before connecting keep their request ids), then the queue.
	var waiting := _waiting_defines
	_waiting_defines = {}
	for npc_id in _npcs:
		var ids: Array = waiting.get(npc_id, [])
		if ids.is_empty():
			ids = [new_request_id()]
		for request_id in ids:
			_request_npc[request_id] = npc_id
			_started[request_id] = _started.get(request_id, _now())
			_send(_frame(ZykeProtocol.FRAME_NPC_DEFINE, request_id, {"npc": _npcs[npc_id]}), npc_id)
	var queued := _outbox
	_outbox = []
	for item in queued:
		_send(item["frame"], item["npc"])
	connected.emit(welcome)


func _on_closed(code: int, reason: String) -> void:
	var was_ready := status == Status.READY
	if not was_ready:
		var target := url if url != "" else ZykeLocator.default_url()
		var why := reason if reason != "" else "closed (%d)" % code
		_report_connection(CONNECTION_FAILED,
			"cannot reach zyke-daemon at %s: %s (is it running?)" % [target, why])
	status = Status.DISCONNECTED
	_hello_id = ""
	welcome = {}
	_expired = {}
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
	var waiting := _waiting_defines
	_waiting_defines = {}
	for npc_id in waiting:
		for request_id in waiting[npc_id]:
			_fail(request_id, npc_id, code, message)


## Like [method close], for a hello the daemon refused (wrong token or protocol): stop
## reconnecting, and fail everything waiting with the refusal's code.
func _stop(code: String, message: String) -> void:
	_ws.close(1000, "client stopped")
	_fail_all(code, message)
	status = Status.STOPPED


## Tell the game, once per attempt, that connecting or authenticating failed.
func _report_connection(code: String, message: String) -> void:
	if _reported:
		return
	_reported = true
	connection_failed.emit(code, message)
	error.emit(code, message, "")


## Fail requests older than [member request_timeout] (queued, waiting to define, or in flight).
func _expire_overdue(now: float) -> void:
	if request_timeout <= 0.0 or _started.is_empty():
		return
	var overdue: Array[String] = []
	for request_id in _started:
		if now - float(_started[request_id]) > request_timeout:
			overdue.append(request_id)
	for request_id in overdue:
		_expire(request_id)


func _expire(request_id: String) -> void:
	var npc_id := npc_of(request_id)
	var message := "no answer after %s s (ZykeClient.request_timeout)" % request_timeout
	if _pending.has(request_id):
		var info: Dictionary = _pending[request_id]
		_pending.erase(request_id)
		_expired[request_id] = true
		if info.get("type") == ZykeProtocol.FRAME_NPC_SAY and status == Status.READY:
			var cancel_id := new_request_id()
			_expired[cancel_id] = true
			var cancel_frame := _frame(ZykeProtocol.FRAME_CANCEL, cancel_id, {"target": request_id})
			_ws.send_text(JSON.stringify(cancel_frame))
	for i in range(_outbox.size() - 1, -1, -1):
		if _outbox[i]["frame"]["id"] == request_id:
			_outbox.remove_at(i)
	for waiting_npc in _waiting_defines:
		_waiting_defines[waiting_npc].erase(request_id)
	_fail(request_id, npc_id, ZykeProtocol.ERROR_TIMEOUT, message)


func _fail(request_id: String, npc_id: String, code: String, message: String) -> void:
	if npc_id != "":
		_request_npc[request_id] = npc_id
	var frame := _error_frame(request_id, code, message)
	if request_id != "":
		_started.erase(request_id)
		_keep_answer(request_id, frame)
	error.emit(code, message, request_id)
	response_received.emit(frame)
	_request_npc.erase(request_id)


func _keep_answer(request_id: String, frame: Dictionary) -> void:
	if request_id == "":
		return
	if not _answers.has(request_id):
		_answer_order.append(request_id)
	_answers[request_id] = frame
	while _answer_order.size() > KEEP_ANSWERS:
		_answers.erase(_answer_order.pop_front())


static func _error_frame(request_id: String, code: String, message: String) -> Dictionary:
	return {
		"v": ZykeProtocol.PROTOCOL_VERSION,
		"type": ZykeProtocol.FRAME_ERROR,
		"id": request_id,
		"code": code,
		"message": message,
	}


static func _now() -> float:
	return Time.get_ticks_msec() / 1000.0


## Why [param value] cannot be sent as JSON, or "" when it can: JSON.stringify would turn an Object,
## a Vector2 or a Callable into a string, NaN and infinities into text that is not JSON (the daemon
## could only answer an error without the request's id), and loop forever on a cycle.
static func json_problem(value: Variant, path := "", depth := 0) -> String:
	if depth > MAX_DEPTH:
		return "%s nests deeper than %d levels (a cycle?)" % [_path_name(path), MAX_DEPTH]
	match typeof(value):
		TYPE_NIL, TYPE_BOOL, TYPE_INT, TYPE_STRING, TYPE_STRING_NAME:
			return ""
		TYPE_FLOAT:
			if is_finite(value):
				return ""
			return "%s is %s, which JSON cannot carry" % [_path_name(path), value]
		TYPE_DICTIONARY:
			for key in value:
				var problem := json_problem(value[key], "%s.%s" % [path, key], depth + 1)
				if problem != "":
					return problem
			return ""
		TYPE_ARRAY:
			for i in range(value.size()):
				var problem := json_problem(value[i], "%s[%d]" % [path, i], depth + 1)
				if problem != "":
					return problem
			return ""
		TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_INT64_ARRAY:
			return ""
		TYPE_PACKED_FLOAT32_ARRAY, TYPE_PACKED_FLOAT64_ARRAY:
			for i in range(value.size()):
				if not is_finite(value[i]):
					return "%s[%d] is %s, which JSON cannot carry" % [_path_name(path), i, value[i]]
			return ""
	return "%s is a %s, which JSON cannot carry (use a Dictionary, Array, String, number or bool)" % [
		_path_name(path), type_string(typeof(value))]


static func _path_name(path: String) -> String:
	return "value" if path == "" else path.trim_prefix(".")


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
		TYPE_PACKED_STRING_ARRAY, TYPE_PACKED_INT32_ARRAY, TYPE_PACKED_INT64_ARRAY:
			return Array(value)
		TYPE_PACKED_FLOAT32_ARRAY, TYPE_PACKED_FLOAT64_ARRAY:
			return _normalize(Array(value))
	return value
