using System;
using System.Collections.Generic;
using System.IO;
using System.Net.WebSockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Zyke
{
    public sealed class ZykeClientOptions
    {
        /// <summary>Daemon address; null means ZykeLocator.DefaultUrl() (ZYKE_URL, runtime file, port 7341).</summary>
        public string Url;
        /// <summary>Daemon token; null means ZykeLocator.ReadToken() (ZYKE_TOKEN, token file).</summary>
        public string Token;
        /// <summary>Namespace for NPC ids and saved sessions on the daemon; null means "default".</summary>
        public string Game;
        public string ClientName = "zyke-unity";
        public string ClientVersion = "0.1.0";
        public TimeSpan ConnectTimeout = TimeSpan.FromSeconds(10);
        /// <summary>How long a request may wait for its answer before ZykeTimeoutException (and a cancel frame).</summary>
        public TimeSpan RequestTimeout = TimeSpan.FromSeconds(120);
        /// <summary>Reconnect in the background after a lost connection, re-defining known NPCs.</summary>
        public bool AutoReconnect = true;
        public TimeSpan ReconnectMinDelay = TimeSpan.FromSeconds(0.5);
        public TimeSpan ReconnectMaxDelay = TimeSpan.FromSeconds(15);
    }

    /// <summary>
    /// Client of the local zyke-daemon (protocol v1) over System.Net.WebSockets. Thread-safe; every
    /// method is async. Events and OnDelta callbacks run on the client's receive thread, not on a
    /// game's main thread: the Unity ZykeNPC component marshals them.
    /// </summary>
    public sealed class ZykeClient : IDisposable
    {
        /// <summary>Authenticated (first connect and every reconnect).</summary>
        public event Action<WelcomeInfo> Connected;
        /// <summary>The connection closed; the argument says why.</summary>
        public event Action<string> Disconnected;
        /// <summary>An error frame that answers no request (id null), e.g. bad_json.</summary>
        public event Action<ZykeException> UnsolicitedError;

        readonly ZykeClientOptions _options;
        readonly object _lock = new object();
        readonly Dictionary<string, NpcSpec> _npcs = new Dictionary<string, NpcSpec>();
        readonly CancellationTokenSource _lifetime = new CancellationTokenSource();
        Connection _conn;
        Task<Connection> _connecting;
        bool _disposed;
        int _nextId;

        public ZykeClient() : this(new ZykeClientOptions()) { }

        public ZykeClient(ZykeClientOptions options)
        {
            _options = options ?? new ZykeClientOptions();
        }

        public ZykeClientOptions Options { get { return _options; } }

        public bool IsConnected
        {
            get { lock (_lock) return _conn != null && !_conn.Closed; }
        }

        /// <summary>The last welcome (null before the first connect).</summary>
        public WelcomeInfo Welcome { get; private set; }

        /// <summary>A fresh request id, e.g. to know a say's id before its reply arrives.</summary>
        public string NewRequestId()
        {
            return "u" + Interlocked.Increment(ref _nextId).ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        /// <summary>Connect and authenticate (requests also connect on demand).</summary>
        public async Task<WelcomeInfo> ConnectAsync(CancellationToken ct = default(CancellationToken))
        {
            var conn = await GetConnectionAsync(ct).ConfigureAwait(false);
            return conn.Welcome;
        }

        /// <summary>Define or update an NPC; it is re-defined on every (re)connect. Returns its saved history length.
        /// The definition is remembered before it is sent: when the daemon is not up yet this throws
        /// ZykeConnectionException, and the NPC is defined as soon as a later request connects. Only the
        /// daemon refusing the definition (e.g. bad_frame) makes the client forget it again.</summary>
        public async Task<int> DefineAsync(NpcSpec spec, CancellationToken ct = default(CancellationToken))
        {
            if (spec == null) throw new ArgumentNullException("spec");
            var frame = NewFrame(ProtocolConstants.FrameTypes.NpcDefine, null);
            frame["npc"] = spec;
            string text = Serialize(frame);
            NpcSpec previous;
            lock (_lock)
            {
                _npcs.TryGetValue(spec.Id ?? "", out previous);
                _npcs[spec.Id ?? ""] = spec;
            }
            Dictionary<string, object> answer;
            try
            {
                answer = await RequestCoreAsync(frame, text, null, ct).ConfigureAwait(false);
            }
            catch (ZykeException e)
            {
                bool refused = !(e is ZykeConnectionException || e is ZykeTimeoutException || e is ZykeCancelledException
                                 || e is ZykeAuthException || e is ZykeVersionException);
                if (refused)
                {
                    lock (_lock)
                    {
                        NpcSpec current;
                        if (_npcs.TryGetValue(spec.Id ?? "", out current) && current == spec)
                        {
                            if (previous != null) _npcs[spec.Id ?? ""] = previous;
                            else _npcs.Remove(spec.Id ?? "");
                        }
                    }
                }
                throw;
            }
            return (int)JsonRead.Long(answer, "history_turns");
        }

        /// <summary>Whether the client re-defines this NPC on every (re)connect.</summary>
        public bool IsKnown(string npcId)
        {
            lock (_lock) return npcId != null && _npcs.ContainsKey(npcId);
        }

        /// <summary>Stop re-defining an NPC on reconnect (the daemon keeps its history).</summary>
        public void Forget(string npcId)
        {
            lock (_lock) if (npcId != null) _npcs.Remove(npcId);
        }

        /// <summary>Say something to an NPC; pass onDelta to stream the spoken line as it is generated.</summary>
        public Task<SayResult> SayAsync(string npcId, string input, Action<string> onDelta = null,
                                        CancellationToken ct = default(CancellationToken))
        {
            return SayAsync(new SayRequest { NpcId = npcId, Input = input, OnDelta = onDelta }, ct);
        }

        public async Task<SayResult> SayAsync(SayRequest request, CancellationToken ct = default(CancellationToken))
        {
            if (request == null) throw new ArgumentNullException("request");
            var frame = NewFrame(ProtocolConstants.FrameTypes.NpcSay, request.RequestId);
            frame["npc"] = request.NpcId;
            frame["input"] = request.Input ?? "";
            frame["stream"] = request.OnDelta != null;
            if (request.State != null) frame["state"] = request.State;
            if (request.Options != null) frame["options"] = request.Options;
            if (request.Adapter != null) frame["adapter"] = request.Adapter;
            if (request.AllowedActions != null) frame["allowed_actions"] = new List<string>(request.AllowedActions);
            if (request.Priority != null) frame["priority"] = request.Priority;
            if (request.DeadlineMs != null) frame["deadline_ms"] = request.DeadlineMs.Value;
            if (request.SafetyReport) frame["safety_report"] = true;
            var answer = await RequestAsync(frame, request.OnDelta, ct).ConfigureAwait(false);
            return SayResult.FromFrame(answer);
        }

        /// <summary>Stop a say in flight on this connection; the say then fails with ZykeCancelledException.</summary>
        public Task CancelAsync(string targetRequestId, CancellationToken ct = default(CancellationToken))
        {
            var frame = NewFrame(ProtocolConstants.FrameTypes.Cancel, null);
            frame["target"] = targetRequestId;
            return RequestAsync(frame, null, ct);
        }

        /// <summary>Rate an earlier reply after the fact (docs/EXPERIENCE.md): replyId is its SayResult.RequestId,
        /// reward from -1 (it broke the scene) to 1 (the player laughed), label what would have been right (null:
        /// none), source "game", "player" or "simulated" (null: game). Recorded with the reply when the daemon
        /// records experience and the NPC has Record set; otherwise a ZykeException with Code not_recording,
        /// unknown_reply, bad_label or experience_full. Needs the daemon's "feedback" capability.</summary>
        public Task FeedbackAsync(string npcId, string replyId, double reward, FeedbackLabel label = null,
                                  string source = null, CancellationToken ct = default(CancellationToken))
        {
            var frame = NewFrame(ProtocolConstants.FrameTypes.Feedback, null);
            frame["npc"] = npcId;
            frame["reply_id"] = replyId;
            frame["reward"] = reward;
            if (label != null) frame["label"] = label.ToJson();
            if (source != null) frame["source"] = source;
            return RequestAsync(frame, null, ct);
        }

        /// <summary>Forget an NPC's conversation history.</summary>
        public Task ResetAsync(string npcId, CancellationToken ct = default(CancellationToken))
        {
            var frame = NewFrame(ProtocolConstants.FrameTypes.NpcReset, null);
            frame["npc"] = npcId;
            return RequestAsync(frame, null, ct);
        }

        /// <summary>An NPC's state (definition and history, protocol NpcState) for a game's save file.</summary>
        public async Task<Dictionary<string, object>> GetStateAsync(string npcId, CancellationToken ct = default(CancellationToken))
        {
            var frame = NewFrame(ProtocolConstants.FrameTypes.NpcStateGet, null);
            frame["npc"] = npcId;
            var answer = await RequestAsync(frame, null, ct).ConfigureAwait(false);
            return JsonRead.Obj(answer, "state");
        }

        public async Task<string> GetStateJsonAsync(string npcId, CancellationToken ct = default(CancellationToken))
        {
            return Json.Serialize(await GetStateAsync(npcId, ct).ConfigureAwait(false));
        }

        /// <summary>Restore a saved NPC state; the NPC becomes one this client re-defines on reconnect.</summary>
        public async Task<Dictionary<string, object>> SetStateAsync(Dictionary<string, object> state,
                                                                    CancellationToken ct = default(CancellationToken))
        {
            if (state == null) throw new ArgumentNullException("state");
            var frame = NewFrame(ProtocolConstants.FrameTypes.NpcStateSet, null);
            frame["state"] = state;
            var answer = await RequestAsync(frame, null, ct).ConfigureAwait(false);
            var restored = JsonRead.Obj(answer, "state");
            var npc = JsonRead.Obj(restored, "npc");
            if (npc != null) lock (_lock) _npcs[JsonRead.Str(npc, "id")] = NpcSpec.FromJson(npc);
            return restored;
        }

        public Task<Dictionary<string, object>> SetStateJsonAsync(string stateJson, CancellationToken ct = default(CancellationToken))
        {
            return SetStateAsync(Json.ParseObject(stateJson), ct);
        }

        public async Task<List<AdapterInfo>> ListAdaptersAsync(CancellationToken ct = default(CancellationToken))
        {
            var answer = await RequestAsync(NewFrame(ProtocolConstants.FrameTypes.AdapterList, null), null, ct).ConfigureAwait(false);
            var result = new List<AdapterInfo>();
            var list = answer.ContainsKey("adapters") ? answer["adapters"] as List<object> : null;
            if (list != null)
            {
                foreach (object item in list)
                {
                    var a = item as Dictionary<string, object>;
                    if (a == null) continue;
                    object loaded;
                    result.Add(new AdapterInfo
                    {
                        Name = JsonRead.Str(a, "name"),
                        Base = JsonRead.Str(a, "base"),
                        Rank = a.ContainsKey("rank") ? (int?)JsonRead.Long(a, "rank") : null,
                        Loaded = a.TryGetValue("loaded", out loaded) && loaded is bool && (bool)loaded,
                    });
                }
            }
            return result;
        }

        /// <summary>Round trip to the daemon.</summary>
        public async Task<TimeSpan> PingAsync(CancellationToken ct = default(CancellationToken))
        {
            var watch = System.Diagnostics.Stopwatch.StartNew();
            await RequestAsync(NewFrame(ProtocolConstants.FrameTypes.Ping, null), null, ct).ConfigureAwait(false);
            return watch.Elapsed;
        }

        /// <summary>Send any request frame (v and id are filled in when missing) and await its answer frame.
        /// A frame that cannot be written as JSON (NaN, an object the writer does not know, a cycle) throws
        /// ZykeArgumentException at once, before any connecting.</summary>
        public Task<Dictionary<string, object>> RequestAsync(Dictionary<string, object> frame, Action<string> onDelta,
                                                             CancellationToken ct = default(CancellationToken))
        {
            if (frame == null) throw new ArgumentNullException("frame");
            if (!frame.ContainsKey("v")) frame["v"] = ProtocolConstants.ProtocolVersion;
            if (!frame.ContainsKey("id")) frame["id"] = NewRequestId();
            string text;
            try
            {
                text = Serialize(frame);
            }
            catch (ZykeArgumentException e)
            {
                var failed = new TaskCompletionSource<Dictionary<string, object>>();
                failed.SetException(e);
                return failed.Task;
            }
            return RequestCoreAsync(frame, text, onDelta, ct);
        }

        /// <summary>The frame as JSON, or ZykeArgumentException naming what cannot be written.</summary>
        static string Serialize(Dictionary<string, object> frame)
        {
            try
            {
                return Json.Serialize(frame);
            }
            catch (FormatException e)
            {
                object id;
                frame.TryGetValue("id", out id);
                object type;
                frame.TryGetValue("type", out type);
                throw new ZykeArgumentException("cannot send " + type + ": " + e.Message, id as string, e);
            }
        }

        async Task<Dictionary<string, object>> RequestCoreAsync(Dictionary<string, object> frame, string text,
                                                                Action<string> onDelta, CancellationToken ct)
        {
            if (ct.IsCancellationRequested) throw new ZykeCancelledException("cancelled before sending", (string)frame["id"]);
            Connection conn;
            try
            {
                conn = await WithTimeout(GetConnectionAsync(ct), _options.RequestTimeout, (string)frame["id"]).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                throw new ZykeCancelledException("cancelled while connecting", (string)frame["id"]);
            }
            return await conn.RequestAsync(frame, onDelta, _options.RequestTimeout, ct, text).ConfigureAwait(false);
        }

        Dictionary<string, object> NewFrame(string type, string id)
        {
            return new Dictionary<string, object>
            {
                { "v", ProtocolConstants.ProtocolVersion }, { "type", type }, { "id", id ?? NewRequestId() },
            };
        }

        Task<Connection> GetConnectionAsync(CancellationToken ct)
        {
            Task<Connection> task;
            lock (_lock)
            {
                if (_disposed) throw new ObjectDisposedException("ZykeClient");
                if (_conn != null && !_conn.Closed) return Task.FromResult(_conn);
                if (_connecting == null || _connecting.IsCompleted) _connecting = ConnectLoopAsync(false);
                task = _connecting;
            }
            return WithCancellation(task, ct);
        }

        async Task<Connection> ConnectLoopAsync(bool retry)
        {
            TimeSpan delay = _options.ReconnectMinDelay;
            var random = new Random();
            while (true)
            {
                try
                {
                    return await OpenAsync().ConfigureAwait(false);
                }
                catch (ZykeAuthException) { throw; }
                catch (ZykeVersionException) { throw; }
                catch (ZykeException)
                {
                    if (!retry || _lifetime.IsCancellationRequested) throw;
                }
                double jitter = 0.8 + 0.4 * random.NextDouble();
                await Task.Delay(TimeSpan.FromMilliseconds(delay.TotalMilliseconds * jitter), _lifetime.Token).ConfigureAwait(false);
                delay = TimeSpan.FromMilliseconds(Math.Min(delay.TotalMilliseconds * 2, _options.ReconnectMaxDelay.TotalMilliseconds));
            }
        }

        async Task<Connection> OpenAsync()
        {
            string url = _options.Url ?? ZykeLocator.DefaultUrl();
            string token = _options.Token ?? ZykeLocator.ReadToken();
            if (token == null)
                throw new ZykeAuthException(ProtocolConstants.ErrorCodes.Unauthorized,
                    "no token: set ZykeClientOptions.Token or ZYKE_TOKEN, or start zyke-daemon once to create its token file", null);
            var ws = new ClientWebSocket();
            try
            {
                using (var cts = CancellationTokenSource.CreateLinkedTokenSource(_lifetime.Token))
                {
                    cts.CancelAfter(_options.ConnectTimeout);
                    await ws.ConnectAsync(new Uri(url), cts.Token).ConfigureAwait(false);
                }
            }
            catch (Exception e)
            {
                ws.Dispose();
                throw new ZykeConnectionException("cannot connect to " + url + ": " + e.Message, null, e);
            }
            var conn = new Connection(this, ws);
            conn.Start();
            var hello = NewFrame(ProtocolConstants.FrameTypes.Hello, null);
            hello["token"] = token;
            hello["protocol"] = ProtocolConstants.ProtocolVersion;
            hello["client"] = new Dictionary<string, object> { { "name", _options.ClientName }, { "version", _options.ClientVersion } };
            if (_options.Game != null) hello["game"] = _options.Game;
            try
            {
                var welcome = await conn.RequestAsync(hello, null, _options.ConnectTimeout, CancellationToken.None).ConfigureAwait(false);
                conn.Welcome = WelcomeInfo.FromFrame(welcome);
                if (conn.Welcome.Protocol != ProtocolConstants.ProtocolVersion)
                    throw new ZykeVersionException(ZykeException.VersionMismatch,
                        "daemon speaks protocol " + conn.Welcome.Protocol + ", this client " + ProtocolConstants.ProtocolVersion, null);
                List<NpcSpec> known;
                lock (_lock) known = new List<NpcSpec>(_npcs.Values);
                foreach (var spec in known)
                {
                    var define = NewFrame(ProtocolConstants.FrameTypes.NpcDefine, null);
                    define["npc"] = spec;
                    try
                    {
                        await conn.RequestAsync(define, null, _options.RequestTimeout, CancellationToken.None).ConfigureAwait(false);
                    }
                    catch (ZykeConnectionException) { throw; }
                    catch (ZykeTimeoutException) { throw; }
                    catch (ZykeException e)
                    {
                        // The daemon refuses this definition: stop re-sending it, and say so.
                        lock (_lock)
                        {
                            NpcSpec current;
                            if (_npcs.TryGetValue(spec.Id ?? "", out current) && current == spec) _npcs.Remove(spec.Id ?? "");
                        }
                        Raise(UnsolicitedError, e);
                    }
                }
            }
            catch (ZykeException)
            {
                conn.Abort();
                throw;
            }
            lock (_lock)
            {
                if (_disposed) { conn.Abort(); throw new ObjectDisposedException("ZykeClient"); }
                _conn = conn;
            }
            Welcome = conn.Welcome;
            Raise(Connected, conn.Welcome);
            return conn;
        }

        void OnConnectionClosed(Connection conn, string reason)
        {
            bool current;
            lock (_lock)
            {
                current = _conn == conn;
                if (current) _conn = null;
                if (current && _options.AutoReconnect && !_disposed && (_connecting == null || _connecting.IsCompleted))
                {
                    _connecting = ConnectLoopAsync(true);
                    _connecting.ContinueWith(t => { var ignored = t.Exception; }, TaskContinuationOptions.OnlyOnFaulted);
                }
            }
            if (current) Raise(Disconnected, reason);
        }

        void Raise<T>(Action<T> handler, T arg)
        {
            if (handler == null) return;
            try { handler(arg); }
            catch (Exception e) { Console.Error.WriteLine("Zyke: an event handler threw: " + e); }
        }

        static async Task<T> WithCancellation<T>(Task<T> task, CancellationToken ct)
        {
            if (!ct.CanBeCanceled || task.IsCompleted) return await task.ConfigureAwait(false);
            var cancelled = new TaskCompletionSource<bool>();
            using (ct.Register(() => cancelled.TrySetResult(true)))
            {
                if (await Task.WhenAny(task, cancelled.Task).ConfigureAwait(false) != task)
                    throw new OperationCanceledException(ct);
            }
            return await task.ConfigureAwait(false);
        }

        static async Task<T> WithTimeout<T>(Task<T> task, TimeSpan timeout, string requestId)
        {
            if (task.IsCompleted) return await task.ConfigureAwait(false);
            if (await Task.WhenAny(task, Task.Delay(timeout)).ConfigureAwait(false) != task)
                throw new ZykeTimeoutException("no connection to the daemon after " + timeout.TotalSeconds + " s", requestId);
            return await task.ConfigureAwait(false);
        }

        /// <summary>Close the connection and stop reconnecting; requests in flight fail with ZykeConnectionException.</summary>
        public async Task CloseAsync()
        {
            Connection conn;
            lock (_lock)
            {
                if (_disposed) return;
                _disposed = true;
                conn = _conn;
                _conn = null;
            }
            _lifetime.Cancel();
            if (conn != null) await conn.CloseAsync().ConfigureAwait(false);
        }

        public void Dispose()
        {
            Connection conn;
            lock (_lock)
            {
                _disposed = true;
                conn = _conn;
                _conn = null;
            }
            _lifetime.Cancel();
            if (conn != null) conn.Abort();
        }

        sealed class Pending
        {
            public readonly TaskCompletionSource<Dictionary<string, object>> Tcs =
                new TaskCompletionSource<Dictionary<string, object>>(TaskCreationOptions.RunContinuationsAsynchronously);
            public Action<string> OnDelta;
            public string Type;
        }

        /// <summary>One WebSocket: its receive loop and the requests waiting on it.</summary>
        sealed class Connection
        {
            readonly ZykeClient _owner;
            readonly ClientWebSocket _ws;
            readonly SemaphoreSlim _sendLock = new SemaphoreSlim(1, 1);
            readonly Dictionary<string, Pending> _pending = new Dictionary<string, Pending>();
            volatile bool _closed;

            public WelcomeInfo Welcome;

            public Connection(ZykeClient owner, ClientWebSocket ws)
            {
                _owner = owner;
                _ws = ws;
            }

            public bool Closed { get { return _closed; } }

            public void Start()
            {
                Task.Run(ReceiveLoopAsync);
            }

            public async Task<Dictionary<string, object>> RequestAsync(Dictionary<string, object> frame, Action<string> onDelta,
                                                                       TimeSpan timeout, CancellationToken ct, string text = null)
            {
                string id = (string)frame["id"];
                string type = (string)frame["type"];
                if (text == null) text = Serialize(frame);
                var pending = new Pending { OnDelta = onDelta, Type = type };
                lock (_pending)
                {
                    if (_closed) throw new ZykeConnectionException("connection closed", id);
                    if (_pending.ContainsKey(id))
                        throw new ZykeException(ProtocolConstants.ErrorCodes.DuplicateId, "request " + id + " is already in flight", id);
                    _pending[id] = pending;
                }
                using (var timer = new CancellationTokenSource(timeout))
                using (ct.Register(() => Abort(id, new ZykeCancelledException("cancelled by the caller", id))))
                using (timer.Token.Register(() => Abort(id, new ZykeTimeoutException(
                           "no answer after " + timeout.TotalSeconds + " s", id))))
                {
                    try
                    {
                        await SendAsync(text).ConfigureAwait(false);
                    }
                    catch (Exception e)
                    {
                        Complete(id, null, new ZykeConnectionException("send failed: " + e.Message, id, e));
                    }
                    return await pending.Tcs.Task.ConfigureAwait(false);
                }
            }

            void Abort(string id, ZykeException why)
            {
                Pending pending;
                lock (_pending)
                {
                    if (!_pending.TryGetValue(id, out pending)) return;
                }
                if (pending.Type == ProtocolConstants.FrameTypes.NpcSay && !_closed)
                {
                    // Stop the generation too; the daemon's answers to both are then ignored.
                    var cancel = new Dictionary<string, object>
                    {
                        { "v", ProtocolConstants.ProtocolVersion }, { "type", ProtocolConstants.FrameTypes.Cancel },
                        { "id", _owner.NewRequestId() }, { "target", id },
                    };
                    SendAsync(Json.Serialize(cancel)).ContinueWith(t => { var ignored = t.Exception; }, TaskContinuationOptions.OnlyOnFaulted);
                }
                Complete(id, null, why);
            }

            void Complete(string id, Dictionary<string, object> frame, ZykeException error)
            {
                Pending pending;
                lock (_pending)
                {
                    if (!_pending.TryGetValue(id, out pending)) return;
                    _pending.Remove(id);
                }
                if (error != null) pending.Tcs.TrySetException(error);
                else pending.Tcs.TrySetResult(frame);
            }

            async Task SendAsync(string text)
            {
                byte[] bytes = Encoding.UTF8.GetBytes(text);
                await _sendLock.WaitAsync().ConfigureAwait(false);
                try
                {
                    // Never pass a caller's token here: cancelling a WebSocket send aborts the socket.
                    await _ws.SendAsync(new ArraySegment<byte>(bytes), WebSocketMessageType.Text, true, CancellationToken.None)
                        .ConfigureAwait(false);
                }
                finally
                {
                    _sendLock.Release();
                }
            }

            async Task ReceiveLoopAsync()
            {
                string reason = "closed by the daemon";
                var buffer = new byte[16384];
                var message = new MemoryStream();
                try
                {
                    while (_ws.State == WebSocketState.Open)
                    {
                        message.SetLength(0);
                        WebSocketReceiveResult result;
                        do
                        {
                            result = await _ws.ReceiveAsync(new ArraySegment<byte>(buffer), CancellationToken.None).ConfigureAwait(false);
                            if (result.MessageType == WebSocketMessageType.Close)
                            {
                                reason = "closed by the daemon (" + result.CloseStatus + " " + result.CloseStatusDescription + ")";
                                return;
                            }
                            message.Write(buffer, 0, result.Count);
                        } while (!result.EndOfMessage);
                        Dispatch(Encoding.UTF8.GetString(message.GetBuffer(), 0, (int)message.Length));
                    }
                }
                catch (Exception e)
                {
                    reason = _closed ? "closed by the client" : "connection lost: " + e.Message;
                }
                finally
                {
                    Shutdown(reason);
                }
            }

            void Dispatch(string text)
            {
                Dictionary<string, object> frame;
                try
                {
                    frame = Json.ParseObject(text);
                }
                catch (FormatException e)
                {
                    _owner.Raise(_owner.UnsolicitedError, new ZykeException(ProtocolConstants.ErrorCodes.BadJson,
                        "daemon sent a frame that is not a JSON object: " + e.Message, null));
                    return;
                }
                string id = JsonRead.Str(frame, "id");
                string type = JsonRead.Str(frame, "type");
                if (type == ProtocolConstants.FrameTypes.ReplyDelta)
                {
                    Pending pending;
                    lock (_pending) _pending.TryGetValue(id ?? "", out pending);
                    if (pending != null && pending.OnDelta != null)
                    {
                        try { pending.OnDelta(JsonRead.Str(frame, "text", "")); }
                        catch (Exception e) { Console.Error.WriteLine("Zyke: an OnDelta callback threw: " + e); }
                    }
                    return;
                }
                if (type == ProtocolConstants.FrameTypes.Error)
                {
                    var error = ZykeException.FromCode(JsonRead.Str(frame, "code", ""), JsonRead.Str(frame, "message", ""), id);
                    if (id == null) _owner.Raise(_owner.UnsolicitedError, error);
                    else Complete(id, null, error);
                    return;
                }
                if (id != null) Complete(id, frame, null);
            }

            void Shutdown(string reason)
            {
                List<KeyValuePair<string, Pending>> lost;
                lock (_pending)
                {
                    _closed = true;
                    lost = new List<KeyValuePair<string, Pending>>(_pending);
                    _pending.Clear();
                }
                foreach (var item in lost)
                    item.Value.Tcs.TrySetException(new ZykeConnectionException(reason, item.Key));
                _ws.Dispose();
                _owner.OnConnectionClosed(this, reason);
            }

            public async Task CloseAsync()
            {
                _closed = true;
                try
                {
                    using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(2)))
                        await _ws.CloseAsync(WebSocketCloseStatus.NormalClosure, "client closed", cts.Token).ConfigureAwait(false);
                }
                catch (Exception)
                {
                    _ws.Abort();
                }
            }

            public void Abort()
            {
                _closed = true;
                try { _ws.Abort(); } catch (Exception) { }
            }
        }
    }
}
