using UnityEngine;
using UnityEngine.UI;
using Zyke.Unity;

namespace Zyke.Samples
{
    /// <summary>
    /// Sample scene script (Tavern.unity): a ZykeNPC named Brom, and a text box to talk to him. With a TextMesh
    /// speech bubble and an InputField wired in, it uses them; without, it draws a text box with OnGUI and
    /// writes the answers to the Console, so the bare sample scene works as it is. Start zyke-daemon first
    /// (a second terminal, or zyke-daemon start --detach); until it is up, the status line says why not.
    /// </summary>
    public class TavernDemo : MonoBehaviour
    {
        public ZykeNPC npc;
        public TextMesh speechBubble;
        public TextMesh mood;
        public InputField input;

        string _typed = "";
        string _bubble = "Talk to me, stranger.";
        string _mood = "";
        string _status = "connecting to zyke-daemon...";

        void Start()
        {
            if (npc == null) npc = GetComponent<ZykeNPC>();
            if (npc == null)
            {
                Debug.LogError("TavernDemo: no ZykeNPC set and none on this GameObject", this);
                enabled = false;
                return;
            }
            npc.OnDelta.AddListener(piece => SetBubble(_bubble == "..." ? piece : _bubble + piece));
            npc.OnReply.AddListener((say, emotion, action) =>
            {
                SetBubble(say);
                SetMood("[" + emotion + " / " + action + "]");
                _status = "ok";
                Debug.Log(npc.displayName + ": " + say + " [" + emotion + " / " + action + "]");
                if (action == "attack") Debug.Log(npc.displayName + " attacks!");
            });
            // Connection problems (daemon not running, wrong token) arrive here too: show them.
            npc.OnError.AddListener((code, message) =>
            {
                _status = "(" + code + ") " + message;
                Debug.LogWarning("Zyke: " + _status, this);
            });
            if (input != null) input.onEndEdit.AddListener(OnSubmit);
        }

        void OnGUI()
        {
            if (input != null) return;
            GUI.Label(new Rect(10, 10, 800, 24), (npc != null ? npc.displayName : "NPC") + ": " + _bubble + " " + _mood);
            _typed = GUI.TextField(new Rect(10, 40, 400, 24), _typed);
            if (GUI.Button(new Rect(420, 40, 80, 24), "Say"))
            {
                OnSubmit(_typed);
                _typed = "";
            }
            GUI.Label(new Rect(10, 70, 800, 24), _status);
        }

        void OnSubmit(string text)
        {
            if (string.IsNullOrEmpty(text) || text.Trim().Length == 0) return;
            if (input != null) input.text = "";
            SetBubble("...");
            npc.Say(text, new System.Collections.Generic.Dictionary<string, object>
            {
                { "location", "tavern" }, { "time_of_day", "evening" },
            });
        }

        void SetBubble(string text)
        {
            _bubble = text;
            if (speechBubble != null) speechBubble.text = text;
        }

        void SetMood(string text)
        {
            _mood = text;
            if (mood != null) mood.text = text;
        }

        /// <summary>Example save/load hooks for a game's save system.</summary>
        public async void SaveGame()
        {
            string json = await npc.SaveStateAsync();
            PlayerPrefs.SetString("zyke.npc." + npc.npcId, json);
        }

        public async void LoadGame()
        {
            string json = PlayerPrefs.GetString("zyke.npc." + npc.npcId, "");
            if (json != "") await npc.LoadStateAsync(json);
        }
    }
}
