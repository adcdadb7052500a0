// End-to-end check of the Zyke C# core against a real zyke-daemon. Built with mcs and run with mono
// by tests/test_bridges_unity.py:  mono e2e.exe <mode> <ws-url> <token>
// Modes: e2e (everything below), json (no daemon: JSON, NpcSpecRepair, argument errors), reconnect (waits for
// the daemon to restart between two says), define-before-connect (defines while the daemon is down, then
// waits for it to start and says).
// Prints one line per check; exits 1 on the first failure.
using System;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Zyke;

static class Program
{
    static int _checks;

    static void Check(bool ok, string what)
    {
        if (!ok) throw new Exception("FAILED: " + what);
        _checks++;
        Console.WriteLine("ok " + _checks + " - " + what);
    }

    static int Main(string[] args)
    {
        if (args.Length < 3)
        {
            Console.Error.WriteLine("usage: e2e.exe <e2e|reconnect|define-before-connect|json> <ws-url> <token>");
            return 2;
        }
        try
        {
            if (args[0] == "json") { JsonChecks(); RepairChecks(); OfflineArgumentChecks().GetAwaiter().GetResult(); }
            else if (args[0] == "reconnect") Reconnect(args[1], args[2]).GetAwaiter().GetResult();
            else if (args[0] == "define-before-connect") DefineBeforeConnect(args[1], args[2]).GetAwaiter().GetResult();
            else { JsonChecks(); EndToEnd(args[1], args[2]).GetAwaiter().GetResult(); }
            Console.WriteLine("PASSED " + _checks + " checks");
            return 0;
        }
        catch (Exception e)
        {
            Console.WriteLine(e.ToString());
            Console.WriteLine("FAILED after " + _checks + " checks");
            return 1;
        }
    }

    static void JsonChecks()
    {
        string text = "{\"a\":[1,-2,3.5,1e3,true,false,null],\"s\":\"q\\\"\\\\\\/\\n\\t\\u00e9\\ud83d\\ude00\",\"o\":{},\"l\":[]}";
        var obj = Json.ParseObject(text);
        var a = (List<object>)obj["a"];
        Check(a[0] is long && (long)a[0] == 1 && (long)a[1] == -2, "json: integers read as long");
        Check(a[2] is double && (double)a[2] == 3.5 && (double)a[3] == 1000.0, "json: fractions and exponents read as double");
        Check(a[4] is bool && (bool)a[4] && !(bool)a[5] && a[6] == null, "json: true, false, null");
        Check((string)obj["s"] == "q\"\\/\n\t\u00e9\U0001F600", "json: string escapes and surrogate pairs");
        Check(((Dictionary<string, object>)obj["o"]).Count == 0 && ((List<object>)obj["l"]).Count == 0, "json: empty containers");
        string again = Json.Serialize(obj);
        Check(Json.Serialize(Json.Parse(again)) == again, "json: write/read round trip is stable");
        Check(Json.Serialize("a\u0001\u2028") == "\"a\\u0001\\u2028\"", "json: control characters escaped");
        Check(Json.Serialize(new Dictionary<string, object> { { "x", 0.1 }, { "y", 2.0 }, { "z", 7 } }) == "{\"x\":0.1,\"y\":2,\"z\":7}",
              "json: numbers written invariantly, whole doubles as integers");
        Thread.CurrentThread.CurrentCulture = new System.Globalization.CultureInfo("de-DE");
        Check(Json.Serialize(1.5) == "1.5" && (double)Json.Parse("1.5") == 1.5, "json: culture-independent (de-DE)");
        Thread.CurrentThread.CurrentCulture = System.Globalization.CultureInfo.InvariantCulture;
        foreach (string bad in new[] { "", "{", "[1,]", "{\"a\" 1}", "01", "\"\\x\"", "tru", "1 2", "{\"a\":1,}", "\"a\nb\"" })
        {
            bool threw = false;
            try { Json.Parse(bad); } catch (FormatException) { threw = true; }
            Check(threw, "json: rejects " + Json.Serialize(bad));
        }
        var spec = new NpcSpec("brom", "p", new[] { "none" }, new[] { "neutral" }) { MaxHistory = 3, DefaultAction = "none" };
        var back = NpcSpec.FromJson(Json.ParseObject(Json.Serialize(spec)));
        Check(back.Id == "brom" && back.MaxHistory == 3 && back.DefaultAction == "none" && back.Actions[0] == "none",
              "json: NpcSpec round trip");
        string described = Json.Serialize(Tam());
        Check(described.Contains("\"actions\":[\"none\",{\"name\":\"ferry_across\",\"description\":\"take the player over the river on the raft\"}"),
              "json: described actions are written as Choice objects, bare ones as labels");
        var tam = NpcSpec.FromJson(Json.ParseObject(described));
        Check(string.Join(",", tam.Actions) == "none,ferry_across,refuse" && tam.ActionDescriptions["refuse"] == "will not take the player"
              && !tam.ActionDescriptions.ContainsKey("none") && tam.EmotionDescriptions["wary"] == "distrustful of the player",
              "json: NpcSpec with descriptions round trip");
        Check(Json.Serialize(tam) == described, "json: described NpcSpec writes back identically");
    }

    /// <summary>Inspector values the daemon refuses are made valid, each change reported.</summary>
    static void RepairChecks()
    {
        Check(NpcSpecRepair.ValidId("Brom (1)") == "brom_1", "repair: GameObject name \"Brom (1)\" -> id brom_1");
        Check(NpcSpecRepair.ValidId("..") == "npc" && NpcSpecRepair.ValidId("") == "npc" && NpcSpecRepair.ValidId(" ( ) ") == "npc",
              "repair: nothing usable -> id npc");
        Check(NpcSpecRepair.ValidId(new string('A', 100)).Length == 64, "repair: ids cut to 64 characters");
        Check(NpcSpecRepair.IsValidId("brom") && !NpcSpecRepair.IsValidId("brom\n") && !NpcSpecRepair.IsValidId("Brom (1)")
              && !NpcSpecRepair.IsValidId(".."), "repair: IsValidId follows the protocol (no trailing newline, not only dots)");
        var problems = new List<SpecProblem>();
        var spec = NpcSpecRepair.Repair(BadInspectorSpec(), "Brom (1)", problems);
        Check(spec.Id == "brom_1", "repair: invalid npcId replaced by " + spec.Id);
        Check(spec.Persona.StartsWith("Brom (1), a character", StringComparison.Ordinal), "repair: empty persona -> " + Json.Serialize(spec.Persona));
        Check(string.Join(",", spec.Actions) == "none,trade" && string.Join(",", spec.Emotions) == "neutral",
              "repair: invalid and repeated labels left out, empty emotions -> neutral");
        Check(spec.DefaultAction == null && spec.DefaultEmotion == null, "repair: default action outside the list left out");
        Check(spec.ActionDescriptions.Count == 1 && spec.ActionDescriptions["trade"] == "buy or sell", "repair: descriptions kept for kept labels");
        Check(problems.Exists(p => !p.IsError && p.Message.Contains("persona")) && problems.FindAll(p => p.IsError).Count == 8,
              "repair: one warning (persona) and eight errors reported:\n" + NpcSpecRepair.Describe(problems).TrimEnd());
        var good = Brom();
        var clean = new List<SpecProblem>();
        var same = NpcSpecRepair.Repair(good, "Brom", clean);
        Check(clean.Count == 0 && Json.Serialize(same) == Json.Serialize(good), "repair: a valid spec is left as it is");
    }

    /// <summary>What a game developer types into a fresh ZykeNPC inspector by mistake.</summary>
    static NpcSpec BadInspectorSpec()
    {
        var spec = new NpcSpec("Brom (1)", "", new[] { "none", "trade", "bad label!", "trade" }, new[] { "", " " })
        {
            DefaultAction = "attack", DefaultEmotion = "furious",
        };
        spec.ActionDescriptions["trade"] = "buy or sell";
        spec.ActionDescriptions["bad label!"] = "never sent";
        return spec;
    }

    /// <summary>A state JSON cannot carry is an argument error, not a connection error, and needs no daemon.</summary>
    static async Task OfflineArgumentChecks()
    {
        using (var client = new ZykeClient(new ZykeClientOptions
               { Url = "ws://127.0.0.1:9", Token = "unused", ConnectTimeout = TimeSpan.FromSeconds(2) }))
        {
            await ExpectArgumentError(client, "offline");
        }
    }

    static async Task ExpectArgumentError(ZykeClient client, string when)
    {
        var cyclic = new Dictionary<string, object>();
        cyclic["self"] = cyclic;
        var bad = new[]
        {
            new KeyValuePair<string, object>("NaN", double.NaN),
            new KeyValuePair<string, object>("an object the writer does not know", new object()),
            new KeyValuePair<string, object>("a cycle", cyclic),
        };
        foreach (var item in bad)
        {
            var request = new SayRequest { NpcId = "brom", Input = "hi", RequestId = client.NewRequestId(),
                                           State = new Dictionary<string, object> { { "x", item.Value } } };
            var watch = System.Diagnostics.Stopwatch.StartNew();
            try
            {
                await client.SayAsync(request);
                Check(false, when + ": a state with " + item.Key + " fails");
            }
            catch (ZykeArgumentException e)
            {
                Check(e.Code == ZykeException.InvalidArgument && e.RequestId == request.RequestId && watch.Elapsed.TotalSeconds < 1,
                      when + ": state with " + item.Key + ": ZykeArgumentException " + e.Code + " at once (" + e.Message + ")");
            }
            catch (ZykeException e)
            {
                Check(false, when + ": state with " + item.Key + " must be an argument error, not " + e.GetType().Name + " " + e.Code);
            }
        }
    }

    static ZykeClient NewClient(string url, string token)
    {
        return new ZykeClient(new ZykeClientOptions
        {
            Url = url, Token = token, Game = "csharp-e2e", ClientVersion = "0.1.0",
            RequestTimeout = TimeSpan.FromSeconds(90),
        });
    }

    static readonly string[] Actions = { "none", "trade", "repair", "attack" };
    static readonly string[] Emotions = { "neutral", "angry", "pleased" };

    static NpcSpec Brom()
    {
        return new NpcSpec("brom", "A grumpy dwarf blacksmith who loves his forge.", Actions, Emotions)
        {
            Name = "Brom", DefaultEmotion = "neutral", DefaultAction = "none", MaxHistory = 8,
        };
    }

    /// <summary>An NPC whose game-specific labels only make sense with their descriptions.</summary>
    static NpcSpec Tam()
    {
        return new NpcSpec("tam", "A taciturn ferryman on the Grey River who takes coin and asks no questions.",
            new Choice[] { "none", new Choice("ferry_across", "take the player over the river on the raft"),
                           new Choice("refuse", "will not take the player") },
            new Choice[] { "neutral", new Choice("wary", "distrustful of the player") }) { Name = "Old Tam" };
    }

    static SayRequest Say(string input, Action<string> onDelta = null, int maxTokens = 24)
    {
        return new SayRequest
        {
            NpcId = "brom", Input = input, OnDelta = onDelta,
            State = new Dictionary<string, object> { { "location", "forge" }, { "gold", 12 } },
            Options = new GenerationOptions { MaxTokens = maxTokens, Temperature = 0, Seed = 7 },
        };
    }

    static void CheckReply(SayResult r, string what)
    {
        Check(r.Reply != null && r.Reply.Say != null, what + ": reply has a say");
        Check(Array.IndexOf(Actions, r.Reply.Action) >= 0, what + ": action '" + r.Reply.Action + "' is a declared action");
        Check(Array.IndexOf(Emotions, r.Reply.Emotion) >= 0, what + ": emotion '" + r.Reply.Emotion + "' is a declared emotion");
        Check(r.FinishReason == ProtocolConstants.FinishReasons.Stop || r.FinishReason == ProtocolConstants.FinishReasons.Length,
              what + ": finish_reason " + r.FinishReason);
        Check(r.Usage != null && r.Usage.CompletionTokens > 0 && r.Timings.TotalMs > 0, what + ": usage and timings");
    }

    static async Task EndToEnd(string url, string token)
    {
        using (var client = NewClient(url, token))
        {
            int connectedEvents = 0;
            client.Connected += w => Interlocked.Increment(ref connectedEvents);
            var welcome = await client.ConnectAsync();
            Check(welcome.Protocol == ProtocolConstants.ProtocolVersion, "welcome: protocol " + welcome.Protocol);
            Check(!string.IsNullOrEmpty(welcome.DaemonVersion) && welcome.Capabilities.Contains("stream"),
                  "welcome: daemon " + welcome.DaemonVersion + ", model " + welcome.ModelName);
            Check(connectedEvents == 1, "Connected event raised once");

            int turns = await client.DefineAsync(Brom());
            Check(turns >= 0, "npc.define answered (history_turns " + turns + ")");
            await client.ResetAsync("brom");
            Check(true, "npc.reset answered");

            var req = Say("Can you fix my sword?");
            req.RequestId = client.NewRequestId();
            var reply = await client.SayAsync(req);
            Check(reply.RequestId == req.RequestId && reply.NpcId == "brom", "reply carries the request id " + req.RequestId);
            CheckReply(reply, "say");
            try
            {
                await client.FeedbackAsync("brom", reply.RequestId, 1.0, new FeedbackLabel { Action = "repair" }, "player");
                Check(false, "feedback on a daemon that does not record fails");
            }
            catch (ZykeException e)
            {
                Check(e.Code == ProtocolConstants.ErrorCodes.NotRecording, "feedback without recording: code " + e.Code);
            }
            Console.WriteLine("REPLY_JSON " + Json.Serialize(reply.Reply.Raw));

            var pieces = new StringBuilder();
            int deltas = 0;
            var streamed = await client.SayAsync(Say("How much for a new axe?", t => { lock (pieces) { pieces.Append(t); deltas++; } }));
            CheckReply(streamed, "stream");
            Check(deltas > 0, "stream: " + deltas + " deltas");
            Check(pieces.ToString() == streamed.Reply.Say, "stream: deltas concatenate to say (" + Json.Serialize(streamed.Reply.Say) + ")");
            Console.WriteLine("REPLY_JSON " + Json.Serialize(streamed.Reply.Raw));

            try
            {
                await client.SayAsync(new SayRequest { NpcId = "nobody", Input = "hi", RequestId = "bad-1" });
                Check(false, "say to an undefined NPC fails");
            }
            catch (ZykeException e)
            {
                Check(e.Code == ProtocolConstants.ErrorCodes.UnknownNpc && e.RequestId == "bad-1",
                      "say to an undefined NPC: ZykeException code " + e.Code + ", request " + e.RequestId);
            }

            try
            {
                await client.DefineAsync(new NpcSpec("bad id!", "p", Actions, Emotions));
                Check(false, "bad npc id fails");
            }
            catch (ZykeException e)
            {
                Check(e.Code == ProtocolConstants.ErrorCodes.BadFrame, "define with a bad id: code " + e.Code);
            }

            await client.DefineAsync(Tam());
            await client.ResetAsync("tam");
            Check(true, "npc.define with described actions and emotions answered");
            var only = await client.SayAsync(new SayRequest
            {
                NpcId = "tam", Input = "Take me across the river, quick!", AllowedActions = new[] { "none" },
                Options = new GenerationOptions { MaxTokens = 24, Temperature = 0, Seed = 7 },
            });
            Check(only.Reply.Action == "none", "allowed_actions [none]: action '" + only.Reply.Action + "'");
            Console.WriteLine("ALLOWED_REPLY_JSON " + Json.Serialize(only.Reply.Raw));
            try
            {
                await client.SayAsync(new SayRequest { NpcId = "tam", Input = "hi", AllowedActions = new[] { "fly" }, RequestId = "bad-2" });
                Check(false, "an undeclared allowed action fails");
            }
            catch (ZykeException e)
            {
                Check(e.Code == ProtocolConstants.ErrorCodes.UnknownAction && e.RequestId == "bad-2" && e.Message.Contains("fly") && e.Message.Contains("ferry_across"),
                      "undeclared allowed action: code " + e.Code + " (" + e.Message + ")");
            }

            using (var cts = new CancellationTokenSource())
            {
                var slow = client.SayAsync(Say("Tell me the long story of your forge.", null, 400), cts.Token);
                cts.CancelAfter(100);
                try
                {
                    await slow;
                    Check(false, "cancelled say fails");
                }
                catch (ZykeCancelledException e)
                {
                    Check(e.Code == ProtocolConstants.ErrorCodes.Cancelled, "CancellationToken: ZykeCancelledException");
                }
            }

            var state = await client.GetStateAsync("brom");
            var history = state["history"] as List<object>;
            Check(history != null && history.Count >= 2, "npc.state.get: " + history.Count + " turns of history");
            string saved = Json.Serialize(state);
            await client.ResetAsync("brom");
            var afterReset = await client.GetStateAsync("brom");
            Check(((List<object>)afterReset["history"]).Count == 0, "npc.reset forgot the history");
            var restored = await client.SetStateJsonAsync(saved);
            Check(((List<object>)restored["history"]).Count == history.Count, "npc.state.set restored the saved history");

            var rtt = await client.PingAsync();
            Check(rtt >= TimeSpan.Zero, "ping answered in " + (int)rtt.TotalMilliseconds + " ms");
            var adapters = await client.ListAdaptersAsync();
            Check(adapters != null, "adapter.list answered (" + adapters.Count + " adapters)");

            await ExpectArgumentError(client, "connected");
            Check(client.IsConnected, "bad state: the connection stays up");

            var repaired = NpcSpecRepair.Repair(BadInspectorSpec(), "Brom (1)");
            int repairedTurns = await client.DefineAsync(repaired);
            Check(repairedTurns >= 0, "repaired inspector defaults accepted by the daemon (" + repaired.Id + ")");

            var after = await client.SayAsync(Say("Goodbye."));
            CheckReply(after, "connection still usable after errors and a cancel");
            await client.CloseAsync();
        }

        using (var wrong = NewClient(url, "wrong-token"))
        {
            try
            {
                await wrong.ConnectAsync();
                Check(false, "wrong token fails");
            }
            catch (ZykeAuthException e)
            {
                Check(e.Code == ProtocolConstants.ErrorCodes.Unauthorized, "wrong token: ZykeAuthException " + e.Code);
            }
        }
    }

    /// <summary>A game whose NPCs wake before the daemon is up: the definition is remembered and sent on connect,
    /// so the first say after the daemon starts is answered (it used to fail with unknown_npc).</summary>
    static async Task DefineBeforeConnect(string url, string token)
    {
        using (var client = new ZykeClient(new ZykeClientOptions
               {
                   Url = url, Token = token, Game = "csharp-early", RequestTimeout = TimeSpan.FromSeconds(90),
                   ConnectTimeout = TimeSpan.FromSeconds(3),
               }))
        {
            try
            {
                await client.DefineAsync(Brom());
                Check(false, "define while the daemon is down fails");
            }
            catch (ZykeConnectionException e)
            {
                Check(e.Code == ZykeException.ConnectionLost, "define while the daemon is down: ZykeConnectionException (" + e.Message + ")");
            }
            Check(client.IsKnown("brom"), "the definition is remembered for the connect");
            await ExpectArgumentError(client, "daemon down");
            Console.WriteLine("READY_FOR_START");
            Console.Out.Flush();
            Console.ReadLine();
            var reply = await client.SayAsync(Say("Are you open yet?"));
            CheckReply(reply, "say after the daemon started: brom was defined on connect, no unknown_npc");
            await client.CloseAsync();
        }
    }

    static async Task Reconnect(string url, string token)
    {
        using (var client = NewClient(url, token))
        {
            int connected = 0, disconnected = 0;
            client.Connected += w => Interlocked.Increment(ref connected);
            client.Disconnected += r => Interlocked.Increment(ref disconnected);
            await client.DefineAsync(Brom());
            CheckReply(await client.SayAsync(Say("Hello there.")), "before restart");
            Console.WriteLine("READY_FOR_RESTART");
            Console.Out.Flush();
            Console.ReadLine();
            // The daemon restarted: the client notices, reconnects with backoff and re-defines brom.
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while (disconnected == 0 && DateTime.UtcNow < deadline) await Task.Delay(50);
            Check(disconnected >= 1, "Disconnected event after the daemon restarted");
            CheckReply(await client.SayAsync(Say("Are you still there?")), "after restart");
            Check(connected >= 2, "reconnected (" + connected + " Connected events)");
            await client.CloseAsync();
        }
    }
}
