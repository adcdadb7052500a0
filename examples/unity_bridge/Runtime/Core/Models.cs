using System.Collections.Generic;

namespace Zyke
{
    /// <summary>Sampling settings (protocol GenerationOptions); null fields are left to the daemon.</summary>
    public sealed class GenerationOptions : IJsonWritable
    {
        public int? MaxTokens;
        public double? Temperature;
        public double? TopP;
        public int? TopK;
        public long? Seed;
        public double? RepeatPenalty;
        public List<string> Stop;

        public object ToJson()
        {
            var o = new Dictionary<string, object>();
            if (MaxTokens.HasValue) o["max_tokens"] = MaxTokens.Value;
            if (Temperature.HasValue) o["temperature"] = Temperature.Value;
            if (TopP.HasValue) o["top_p"] = TopP.Value;
            if (TopK.HasValue) o["top_k"] = TopK.Value;
            if (Seed.HasValue) o["seed"] = Seed.Value;
            if (RepeatPenalty.HasValue) o["repeat_penalty"] = RepeatPenalty.Value;
            if (Stop != null) o["stop"] = Stop;
            return o;
        }
    }

    /// <summary>
    /// An action or emotion with a description the model reads (protocol Choice). A plain string
    /// converts to a Choice without one, so lists can mix both:
    /// <c>new Choice[] { "none", new Choice("ferry_across", "take the player over the river") }</c>.
    /// </summary>
    public sealed class Choice
    {
        public string Name;
        /// <summary>What the label means, up to 200 characters; null for a bare label.</summary>
        public string Description;

        public Choice(string name, string description = null)
        {
            Name = name;
            Description = description;
        }

        public static implicit operator Choice(string name)
        {
            return new Choice(name);
        }
    }

    /// <summary>An NPC definition (protocol NpcSpec).</summary>
    public sealed class NpcSpec : IJsonWritable
    {
        public string Id;
        public string Name;
        public string Persona;
        /// <summary>The declared actions' names, in order.</summary>
        public List<string> Actions = new List<string>();
        /// <summary>The declared emotions' names, in order.</summary>
        public List<string> Emotions = new List<string>();
        /// <summary>Descriptions of some actions by name; an action without one is sent as a bare label.</summary>
        public Dictionary<string, string> ActionDescriptions = new Dictionary<string, string>();
        /// <summary>Descriptions of some emotions by name.</summary>
        public Dictionary<string, string> EmotionDescriptions = new Dictionary<string, string>();
        public string DefaultEmotion;
        public string DefaultAction;
        public GenerationOptions DefaultOptions;
        public string Adapter;
        public int? MaxHistory;
        /// <summary>Who this NPC speaks to (ProtocolConstants.Audiences; null: the daemon's). It can only narrow
        /// the daemon's audience: the stricter of the two applies (docs/SAFETY.md).</summary>
        public string Audience;
        /// <summary>The declared action a reply takes when the daemon deflects the player's line (null: refuse
        /// when declared, else none).</summary>
        public string RefusalAction;
        /// <summary>Extra words or phrases this NPC never says, on top of its audience's lists.</summary>
        public List<string> BlockedWords;
        /// <summary>Opt in to experience recording: this NPC's replies and the feedback on them are kept on the
        /// player's machine when the daemon records too (--record-experience; docs/EXPERIENCE.md).</summary>
        public bool Record;

        public NpcSpec() { }

        public NpcSpec(string id, string persona, IEnumerable<string> actions, IEnumerable<string> emotions)
        {
            Id = id;
            Persona = persona;
            Actions = new List<string>(actions);
            Emotions = new List<string>(emotions);
        }

        /// <summary>An NPC whose actions and emotions may carry descriptions (strings convert to Choice).</summary>
        public NpcSpec(string id, string persona, IEnumerable<Choice> actions, IEnumerable<Choice> emotions)
        {
            Id = id;
            Persona = persona;
            foreach (var c in actions) Add(Actions, ActionDescriptions, c);
            foreach (var c in emotions) Add(Emotions, EmotionDescriptions, c);
        }

        static void Add(List<string> names, Dictionary<string, string> descriptions, Choice choice)
        {
            names.Add(choice.Name);
            if (choice.Description != null) descriptions[choice.Name] = choice.Description;
        }

        /// <summary>The wire list: a bare label, or {"name", "description"} when the name has a description.</summary>
        static List<object> Wire(List<string> names, Dictionary<string, string> descriptions)
        {
            var list = new List<object>();
            foreach (var name in names)
            {
                string description;
                if (descriptions != null && name != null && descriptions.TryGetValue(name, out description) && description != null)
                    list.Add(new Dictionary<string, object> { { "name", name }, { "description", description } });
                else
                    list.Add(name);
            }
            return list;
        }

        /// <summary>Read a wire list back into names and descriptions.</summary>
        static void Read(Dictionary<string, object> o, string key, List<string> names, Dictionary<string, string> descriptions)
        {
            object v;
            var list = o != null && o.TryGetValue(key, out v) ? v as List<object> : null;
            if (list == null) return;
            foreach (object item in list)
            {
                var s = item as string;
                var c = item as Dictionary<string, object>;
                if (s != null) names.Add(s);
                else if (c != null && JsonRead.Str(c, "name") != null)
                {
                    names.Add(JsonRead.Str(c, "name"));
                    var description = JsonRead.Str(c, "description");
                    if (description != null) descriptions[JsonRead.Str(c, "name")] = description;
                }
            }
        }

        public object ToJson()
        {
            var o = new Dictionary<string, object>
            {
                { "id", Id }, { "persona", Persona },
                { "actions", Wire(Actions, ActionDescriptions) }, { "emotions", Wire(Emotions, EmotionDescriptions) },
            };
            if (Name != null) o["name"] = Name;
            if (MaxHistory.HasValue) o["max_history"] = MaxHistory.Value;
            if (Adapter != null) o["adapter"] = Adapter;
            if (Audience != null) o["audience"] = Audience;
            if (RefusalAction != null) o["refusal_action"] = RefusalAction;
            if (BlockedWords != null && BlockedWords.Count > 0) o["blocked_words"] = new List<object>(BlockedWords);
            if (Record) o["record"] = true;
            if (DefaultEmotion != null || DefaultAction != null || DefaultOptions != null)
            {
                var d = new Dictionary<string, object>();
                if (DefaultEmotion != null) d["emotion"] = DefaultEmotion;
                if (DefaultAction != null) d["action"] = DefaultAction;
                if (DefaultOptions != null) d["options"] = DefaultOptions;
                o["defaults"] = d;
            }
            return o;
        }

        public static NpcSpec FromJson(Dictionary<string, object> o)
        {
            var spec = new NpcSpec
            {
                Id = JsonRead.Str(o, "id"),
                Name = JsonRead.Str(o, "name"),
                Persona = JsonRead.Str(o, "persona"),
                Adapter = JsonRead.Str(o, "adapter"),
            };
            Read(o, "actions", spec.Actions, spec.ActionDescriptions);
            Read(o, "emotions", spec.Emotions, spec.EmotionDescriptions);
            if (o.ContainsKey("max_history")) spec.MaxHistory = (int)JsonRead.Long(o, "max_history");
            spec.Audience = JsonRead.Str(o, "audience");
            spec.RefusalAction = JsonRead.Str(o, "refusal_action");
            if (o.ContainsKey("blocked_words")) spec.BlockedWords = JsonRead.Strings(o, "blocked_words");
            object record;
            spec.Record = o.TryGetValue("record", out record) && record is bool && (bool)record;
            var d = JsonRead.Obj(o, "defaults");
            if (d != null)
            {
                spec.DefaultEmotion = JsonRead.Str(d, "emotion");
                spec.DefaultAction = JsonRead.Str(d, "action");
                var opts = JsonRead.Obj(d, "options");
                if (opts != null)
                {
                    spec.DefaultOptions = new GenerationOptions
                    {
                        MaxTokens = opts.ContainsKey("max_tokens") ? (int?)JsonRead.Long(opts, "max_tokens") : null,
                        Temperature = JsonRead.Num(opts, "temperature"),
                        TopP = JsonRead.Num(opts, "top_p"),
                        TopK = opts.ContainsKey("top_k") ? (int?)JsonRead.Long(opts, "top_k") : null,
                        Seed = opts.ContainsKey("seed") ? (long?)JsonRead.Long(opts, "seed") : null,
                        RepeatPenalty = JsonRead.Num(opts, "repeat_penalty"),
                        Stop = opts.ContainsKey("stop") ? JsonRead.Strings(opts, "stop") : null,
                    };
                }
            }
            return spec;
        }
    }

    /// <summary>What an NPC says and does (npc_reply.json).</summary>
    public sealed class NpcReply
    {
        public string Say;
        public string Emotion;
        public string Action;
        /// <summary>Who or what the action is aimed at, or null.</summary>
        public string Target;
        /// <summary>Free-form action arguments, or null.</summary>
        public Dictionary<string, object> Args;
        /// <summary>The reply object as the daemon sent it.</summary>
        public Dictionary<string, object> Raw;

        public static NpcReply FromJson(Dictionary<string, object> o)
        {
            return new NpcReply
            {
                Say = JsonRead.Str(o, "say", ""),
                Emotion = JsonRead.Str(o, "emotion", ""),
                Action = JsonRead.Str(o, "action", ""),
                Target = JsonRead.Str(o, "target"),
                Args = JsonRead.Obj(o, "args"),
                Raw = o,
            };
        }
    }

    public sealed class Usage
    {
        public int PromptTokens;
        public int CompletionTokens;
        public int? CachedTokens;

        public static Usage FromJson(Dictionary<string, object> o)
        {
            return new Usage
            {
                PromptTokens = (int)JsonRead.Long(o, "prompt_tokens"),
                CompletionTokens = (int)JsonRead.Long(o, "completion_tokens"),
                CachedTokens = o != null && o.ContainsKey("cached_tokens") ? (int?)JsonRead.Long(o, "cached_tokens") : null,
            };
        }
    }

    public sealed class Timings
    {
        public double QueueMs;
        public double TtftMs;
        public double TotalMs;
        public double? TokensPerS;

        public static Timings FromJson(Dictionary<string, object> o)
        {
            return new Timings
            {
                QueueMs = JsonRead.Num(o, "queue_ms") ?? 0,
                TtftMs = JsonRead.Num(o, "ttft_ms") ?? 0,
                TotalMs = JsonRead.Num(o, "total_ms") ?? 0,
                TokensPerS = JsonRead.Num(o, "tokens_per_s"),
            };
        }
    }

    /// <summary>The answer to a say: the reply plus how it was produced.</summary>
    /// <summary>What would have been right for a rated reply (feedback's label): set at least one. Action must
    /// be one the turn allowed, Emotion one the NPC declared.</summary>
    public sealed class FeedbackLabel
    {
        public string Action;
        public string Emotion;
        public string Say;

        public Dictionary<string, object> ToJson()
        {
            var o = new Dictionary<string, object>();
            if (Action != null) o["action"] = Action;
            if (Emotion != null) o["emotion"] = Emotion;
            if (Say != null) o["say"] = Say;
            return o;
        }
    }

    public sealed class SayResult
    {
        public string RequestId;
        public string NpcId;
        public NpcReply Reply;
        /// <summary>"stop" or "length" (ProtocolConstants.FinishReasons).</summary>
        public string FinishReason;
        public string Adapter;
        public Usage Usage;
        public Timings Timings;
        /// <summary>Set when a safety rail intervened (null otherwise); log it, it never holds the blocked text.</summary>
        public SafetyInfo Safety;

        public static SayResult FromFrame(Dictionary<string, object> f)
        {
            return new SayResult
            {
                RequestId = JsonRead.Str(f, "id"),
                NpcId = JsonRead.Str(f, "npc"),
                Reply = NpcReply.FromJson(JsonRead.Obj(f, "reply") ?? new Dictionary<string, object>()),
                FinishReason = JsonRead.Str(f, "finish_reason"),
                Adapter = JsonRead.Str(f, "adapter"),
                Usage = Usage.FromJson(JsonRead.Obj(f, "usage")),
                Timings = Timings.FromJson(JsonRead.Obj(f, "timings")),
                Safety = SafetyInfo.FromJson(JsonRead.Obj(f, "safety")),
            };
        }
    }

    /// <summary>A reply's "safety": which rails intervened, at which stage (docs/SAFETY.md).</summary>
    public sealed class SafetyInfo
    {
        public bool Intervened;
        /// <summary>The audience the reply was held to (ProtocolConstants.Audiences).</summary>
        public string Audience;
        /// <summary>"input:jailbreak", "decode:profanity"... (stage, then ProtocolConstants.SafetyCategories).</summary>
        public List<string> Blocks = new List<string>();

        public static SafetyInfo FromJson(Dictionary<string, object> o)
        {
            if (o == null) return null;
            object v;
            var info = new SafetyInfo { Intervened = o.TryGetValue("intervened", out v) && v is bool && (bool)v,
                                        Audience = JsonRead.Str(o, "audience") };
            var list = o.TryGetValue("blocks", out v) ? v as List<object> : null;
            if (list != null)
                foreach (object item in list)
                {
                    var b = item as Dictionary<string, object>;
                    if (b != null) info.Blocks.Add(JsonRead.Str(b, "stage") + ":" + JsonRead.Str(b, "category"));
                }
            return info;
        }
    }

    /// <summary>Options of one say.</summary>
    public sealed class SayRequest
    {
        public string NpcId;
        public string Input;
        /// <summary>Free-form game state the NPC may react to; serialized with Json.</summary>
        public IDictionary<string, object> State;
        public GenerationOptions Options;
        public string Adapter;
        /// <summary>The actions this line may end in, a subset of the NPC's declared ones (null: all).
        /// A name the NPC did not declare fails with code unknown_action.</summary>
        public IList<string> AllowedActions;
        /// <summary>A ProtocolConstants.Priorities value (null: the NPC's default, else normal): foreground for
        /// the NPC the player talks to, background for chatter (capability "priority").</summary>
        public string Priority;
        /// <summary>Drop the line with code expired if it has not started this many milliseconds after it
        /// reached the daemon (null: no deadline).</summary>
        public int? DeadlineMs;
        /// <summary>true: the result's Safety says when a safety rail intervened (capability "safety"; an older
        /// daemon refuses the field). The rails apply either way (docs/SAFETY.md).</summary>
        public bool SafetyReport;
        /// <summary>Request id to use (ZykeClient.NewRequestId()); one is made when null.</summary>
        public string RequestId;
        /// <summary>Called with each piece of the spoken line (streams when set); runs on the client's receive thread.</summary>
        public System.Action<string> OnDelta;
    }

    /// <summary>The daemon's welcome: who answered and what it can do.</summary>
    public sealed class WelcomeInfo
    {
        public int Protocol;
        public string DaemonVersion;
        public string ModelName;
        public string Backend;
        public List<string> Capabilities;
        public Dictionary<string, object> Raw;

        public static WelcomeInfo FromFrame(Dictionary<string, object> f)
        {
            return new WelcomeInfo
            {
                Protocol = (int)JsonRead.Long(f, "protocol"),
                DaemonVersion = JsonRead.Str(f, "daemon_version"),
                ModelName = JsonRead.Str(JsonRead.Obj(f, "model"), "name"),
                Backend = JsonRead.Str(f, "backend"),
                Capabilities = JsonRead.Strings(f, "capabilities"),
                Raw = f,
            };
        }
    }

    public sealed class AdapterInfo
    {
        public string Name;
        public string Base;
        public int? Rank;
        public bool Loaded;
    }
}
